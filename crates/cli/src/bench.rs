//! `lanyard bench`: the exchange-path benchmark. One run measures two things on the same
//! machine in the same minute:
//!
//! - **The full path**: a throwaway `lanyard serve --dev` (embedded SQLite, every grant
//!   and audit event durable before the answer) under `concurrency` gRPC clients looping
//!   `ExchangeService.Exchange`; exchanges per second, latency percentiles, and the CPU
//!   time the server (and this client) spent per exchange, read from `/proc/<pid>/stat`.
//! - **The crypto-only floor**, in this process, one thread, one operation at a time:
//!   one subject-token verify (ES256, full validation), one credential sign (ES256,
//!   lanyard's key ring) and one durable append (one grant + one audit event, 32 per
//!   SQLite transaction, as the server's group commit does). The floor is the least
//!   work an exchange can do; the ratio of the full path's throughput to the floor's
//!   says how much the rest (gRPC, HTTP/2, policy, logging, the client) costs.
//!
//! ## Why `Instant`
//! This is a benchmark, not a test: durations are read with `std::time::Instant`, which
//! is monotonic. Wall-clock time (for the report's date) still comes from
//! [`SystemClock`].
//!
//! ## Why the client shares the machine
//! The load generator runs on the same cores as the server, as it would in a one-box
//! deployment test. Its CPU is measured and reported next to the server's so a reader
//! can see how much of the machine the client took.

mod revoke;

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use lanyard_core::{Clock, GrantId, SystemClock};
use lanyard_keys::{KeyRing, SigningAlgorithm, install_crypto_provider};
use lanyard_proto::v1 as pb;
use lanyard_proto::v1::exchange_service_client::ExchangeServiceClient;
use lanyard_server::dev::{DEV_AUDIENCE, DEV_DESTINATION, DevIssuer, mint_dev_token};
use lanyard_store::{GrantRecord, GrantStatus, NewAuditEvent, Store};
use lanyard_store_sqlite::SqliteStore;
use serde_json::{Map, Value, json};

use crate::args::{BenchArgs, GlobalArgs, OutputFormat};
use crate::dev_server::DevServer;
use crate::output::{emit, emit_json, kv_table, list_table, note};

/// The `sub` of the benchmark's dev tokens.
const SUBJECT: &str = "bench-agent";
/// The scope every benchmark exchange asks for.
const SCOPE: &str = "read";
/// Lifetime of the benchmark's dev tokens, seconds (the dev issuer has replay protection
/// off, so one token serves many exchanges).
const TOKEN_TTL_SECS: i64 = 3600;
/// How many distinct tokens the clients take turns with.
const TOKENS: usize = 4;
/// How many HTTP/2 connections the clients share (at most one per client task).
const CHANNELS: usize = 4;
/// Grants per transaction in the floor's durable append.
const FLOOR_BATCH: usize = 32;
/// The goal: full-path throughput at least this fraction of the floor's.
const GOAL_RATIO: f64 = 0.5;
/// Issuer URL of the floor's own dev issuer (only ever compared, never fetched).
const FLOOR_ISSUER_URL: &str = "http://127.0.0.1/bench-floor";

/// `lanyard bench`
///
/// # Errors
/// When the server cannot be started or stopped, a floor step fails, or any exchange
/// failed (the results are printed first).
pub async fn bench(g: &GlobalArgs, a: &BenchArgs) -> anyhow::Result<()> {
    install_crypto_provider();
    if let Some(n) = a.revoke {
        return revoke::run(g, n).await;
    }
    if let Some(n) = a.inventory {
        return revoke::inventory(g, n).await;
    }
    if let Some(n) = a.audit_chain {
        return audit_chain(g, n).await;
    }
    let started_at = crate::output::rfc3339(Some(&prost_types::Timestamp {
        seconds: SystemClock.now_unix(),
        nanos: 0,
    }));
    let machine = Machine::read();
    let dir = tempfile::Builder::new()
        .prefix("lanyard-bench-")
        .tempdir()
        .context("creating a throwaway directory")?;

    note(&format!(
        "bench: crypto-only floor, {} iterations per step",
        a.floor_iterations
    ));
    let floor = measure_floor(&dir.path().join("floor"), a.floor_iterations, &machine).await?;

    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    note("bench: starting a throwaway `lanyard serve --dev`");
    let (mut server, ready) = DevServer::start(&data_dir).await?;
    note(&format!(
        "bench: {} clients for {}s warmup + {}s measured against grpc={}",
        a.concurrency, a.warmup, a.duration, ready.grpc
    ));
    let load = match server.pid() {
        Some(pid) => {
            // The load generator runs on one thread of its own (a current-thread
            // runtime), as `h2load` does: it needs about a third of a core, and on a
            // multi-thread runtime its tasks woke each other across threads and fought
            // over each connection's lock, CPU taken from the server it measures.
            let (grpc, dir, args, m) = (
                ready.grpc.clone(),
                data_dir.clone(),
                a.clone(),
                machine.clone(),
            );
            tokio::task::spawn_blocking(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the load generator's runtime")?
                    .block_on(run_load(&grpc, &dir, pid, &args, &m))
            })
            .await
            .context("the load generator failed")
            .and_then(|r| r)
        }
        None => Err(anyhow::anyhow!("the server exited right after starting")),
    };
    let stopped = server.stop().await;
    if load.is_err() || stopped.is_err() {
        server.report_stderr();
    }
    let load = load?;
    stopped.context("stopping the server")?;

    let report = Report {
        command: command_line(),
        started_at,
        machine,
        args: a.clone(),
        channels: CHANNELS.min(a.concurrency as usize),
        load,
        floor,
    };
    match g.output {
        OutputFormat::Json => emit_json(&report.json())?,
        OutputFormat::Table => emit(&report.table())?,
    }
    anyhow::ensure!(
        report.load.failed == 0 && report.load.warmup_failed == 0,
        "{} exchanges failed ({} during warmup); first failure: {}",
        report.load.failed + report.load.warmup_failed,
        report.load.warmup_failed,
        report.load.first_failure.as_deref().unwrap_or("-")
    );
    Ok(())
}

/// The command line as typed (arguments with spaces quoted).
fn command_line() -> String {
    std::env::args_os()
        .map(|a| {
            let a = a.to_string_lossy().into_owned();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// === the audit chain ===

/// Events per append transaction while building the chain.
const CHAIN_BATCH: usize = 1000;
/// A signed checkpoint after this many events, as a busy server would write.
const CHAIN_CHECKPOINT_EVERY: u64 = 10_000;

/// `lanyard bench --audit-chain N`: build, then verify from genesis.
async fn audit_chain(g: &GlobalArgs, n: u64) -> anyhow::Result<()> {
    use lanyard_audit::checkpoint::{CHECKPOINT_TYP, Checkpoint};
    use lanyard_audit::{CheckpointVerifier, VerifyOptions, verify_chain};

    let machine = Machine::read();
    let dir = tempfile::Builder::new()
        .prefix("lanyard-bench-audit-")
        .tempdir()
        .context("creating a throwaway directory")?;
    let store = SqliteStore::open(&dir.path().join("lanyard.db"))
        .await
        .context("opening the throwaway store")?;
    let ring = KeyRing::open(
        &dir.path().join("keys"),
        SigningAlgorithm::ES256,
        std::sync::Arc::new(SystemClock),
    )
    .context("creating a signing key")?;
    note(&format!("bench: building an audit chain of {n} events"));
    let build_start = Instant::now();
    let now_ms = SystemClock.now_unix() * 1000;
    let mut written = 0u64;
    let mut checkpoints = 0u64;
    while written < n {
        let take = (n - written).min(CHAIN_BATCH as u64);
        let events: Vec<NewAuditEvent> = (0..take)
            .map(|i| {
                let k = written + i;
                NewAuditEvent {
                    time_ms: now_ms + k as i64,
                    kind: "exchange.granted".into(),
                    request_id: Some(format!("{:032x}", k)),
                    workload_id: Some(format!("spiffe://lanyard.local/ci/builder-{}", k % 97)),
                    issuer: Some("ci".into()),
                    destination: Some("orders".into()),
                    task_id: Some(format!("run-{}", k / 10)),
                    grant_id: Some(GrantId::generate().to_string()),
                    decision: Some("allow".into()),
                    subject_fingerprint: Some(format!("hmac-sha256:{:064x}", k)),
                    scopes: vec!["read".into()],
                    policy_version: Some("file:sha256:0123456789ab".into()),
                    detail: json!({"ttl_secs": 300, "expires_at": now_ms / 1000 + 300, "trust_rule": "ci", "determining_policies": ["ci-orders"]}),
                    ..NewAuditEvent::default()
                }
            })
            .collect();
        store
            .audit_append(&events)
            .await
            .context("appending events")?;
        let before = written;
        written += take;
        if written / CHAIN_CHECKPOINT_EVERY > before / CHAIN_CHECKPOINT_EVERY {
            let (seq, head_hash) = store.audit_head().await?;
            let cp = Checkpoint {
                iss: "http://127.0.0.1/bench".into(),
                seq,
                head_hash,
                time_ms: now_ms,
            };
            let jws = ring.sign(CHECKPOINT_TYP, &cp.claims())?;
            store.audit_append(&[cp.event(jws.expose())]).await?;
            checkpoints += 1;
        }
    }
    let build = build_start.elapsed();
    let db_bytes = std::fs::metadata(dir.path().join("lanyard.db")).map_or(0, |m| m.len());

    note("bench: verifying from genesis");
    let keys = CheckpointVerifier::from_jwks(&ring.all_public_jwks());
    let cpu0 = cpu_ticks("self")?;
    let t0 = Instant::now();
    let report = verify_chain(
        std::sync::Arc::new(store.clone()),
        &keys,
        &VerifyOptions::default(),
    )
    .await
    .context("verifying")?;
    let wall = t0.elapsed();
    let cpu = machine.ticks_to_us(cpu_ticks("self")?.saturating_sub(cpu0));
    anyhow::ensure!(
        report.ok(),
        "the fresh chain did not verify: {:?}",
        report.breakage
    );
    let total = n + checkpoints;
    anyhow::ensure!(
        report.checked == total,
        "checked {} of {total}",
        report.checked
    );
    let per_sec = total as f64 / wall.as_secs_f64();
    let goal_met = wall.as_secs_f64() < 5.0 || n != 1_000_000;
    match g.output {
        OutputFormat::Json => emit_json(&json!({
            "command": command_line(),
            "machine": {"nproc": machine.nproc, "cpu_model": machine.cpu_model, "kernel": machine.kernel},
            "events": total,
            "checkpoints": checkpoints,
            "build_secs": round_to(build.as_secs_f64(), 3),
            "db_bytes": db_bytes,
            "verify_secs": round_to(wall.as_secs_f64(), 3),
            "verify_cpu_secs": round_to(cpu / 1e6, 3),
            "events_per_sec": round1(per_sec),
            "checkpoints_verified": report.checkpoints_verified,
        }))?,
        OutputFormat::Table => emit(&format!(
            "lanyard bench: audit chain verification\n{}",
            kv_table(&[
                ("command", command_line()),
                (
                    "machine",
                    format!(
                        "{} CPUs, {}, Linux {}",
                        machine.nproc, machine.cpu_model, machine.kernel
                    )
                ),
                (
                    "chain",
                    format!(
                        "{total} events ({n} exchange.granted + {checkpoints} signed checkpoints), {:.0} MB of SQLite",
                        db_bytes as f64 / 1e6
                    )
                ),
                (
                    "built in",
                    format!(
                        "{:.1} s ({CHAIN_BATCH} events per transaction)",
                        build.as_secs_f64()
                    )
                ),
                (
                    "verified in",
                    format!("{:.2} s wall, {:.2} s CPU", wall.as_secs_f64(), cpu / 1e6)
                ),
                (
                    "rate",
                    format!(
                        "{per_sec:.0} events/s, {} checkpoints verified",
                        report.checkpoints_verified
                    )
                ),
                (
                    "goal",
                    if n == 1_000_000 {
                        format!(
                            "1,000,000 events under 5 s: {}",
                            if goal_met { "met" } else { "NOT met" }
                        )
                    } else {
                        "(the goal is stated for 1,000,000 events)".into()
                    }
                ),
            ])
        ))?,
    }
    Ok(())
}

// === machine and CPU time ===

/// Facts about the machine the numbers came from.
#[derive(Debug, Clone)]
struct Machine {
    /// CPUs this process may use.
    nproc: usize,
    /// `model name` from `/proc/cpuinfo`.
    cpu_model: String,
    /// Kernel release.
    kernel: String,
    /// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`).
    clk_tck: u64,
}

impl Machine {
    fn read() -> Self {
        let nproc = std::thread::available_parallelism().map_or(1, usize::from);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let clk_tck = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t: &u64| t > 0)
            .unwrap_or(100);
        Self {
            nproc,
            cpu_model,
            kernel,
            clk_tck,
        }
    }

    /// Clock ticks to microseconds.
    fn ticks_to_us(&self, ticks: u64) -> f64 {
        ticks as f64 * 1e6 / self.clk_tck as f64
    }
}

/// User + system CPU time of a process so far, in clock ticks, from `/proc/<pid>/stat`
/// (`pid` is a number or `self`).
///
/// # Errors
/// When the file cannot be read or does not have the expected shape.
fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_cpu(&text).with_context(|| format!("{path} has no utime/stime fields"))
}

/// utime (field 14) + stime (field 15) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may contain spaces, so fields are counted after the
/// last `)`, where field 3 comes first.
fn parse_stat_cpu(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

// === the crypto-only floor ===

/// One timed floor step.
#[derive(Debug, Clone)]
struct FloorStep {
    name: &'static str,
    iterations: u32,
    /// Wall time per operation, one at a time on one thread, microseconds.
    wall_us: f64,
    /// This process's CPU time per operation over the same loop, microseconds (clock
    /// tick resolution; includes helper threads such as SQLite's).
    cpu_us: f64,
}

/// The floor: three steps, and what they add up to.
#[derive(Debug, Clone)]
struct Floor {
    steps: Vec<FloorStep>,
}

impl Floor {
    /// Wall microseconds of one floor exchange (verify + sign + append).
    fn us_per_exchange(&self) -> f64 {
        self.steps.iter().map(|s| s.wall_us).sum()
    }

    /// CPU microseconds of one floor exchange, as measured.
    fn cpu_us_per_exchange(&self) -> f64 {
        self.steps.iter().map(|s| s.cpu_us).sum()
    }

    /// Floor exchanges per second with every core doing floor work.
    fn throughput(&self, cores: usize) -> f64 {
        div_or_zero(cores as f64 * 1e6, self.us_per_exchange())
    }
}

/// `a / b`, or 0 when `b` is not positive.
fn div_or_zero(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Time `n` runs of `op` (after one untimed run that must succeed): wall time from
/// `Instant`, CPU time from `/proc/self/stat`.
async fn time_steps<F, Fut>(
    name: &'static str,
    n: u32,
    machine: &Machine,
    mut op: F,
) -> anyhow::Result<FloorStep>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u32>>,
{
    // Warm caches and fail fast on a broken setup.
    op().await.with_context(|| format!("floor step {name}"))?;
    let cpu0 = cpu_ticks("self")?;
    let t0 = Instant::now();
    let mut done = 0u32;
    while done < n {
        done += op().await.with_context(|| format!("floor step {name}"))?;
    }
    let wall = t0.elapsed();
    let cpu = cpu_ticks("self")?.saturating_sub(cpu0);
    let n = f64::from(done.max(1));
    Ok(FloorStep {
        name,
        iterations: done,
        wall_us: wall.as_secs_f64() * 1e6 / n,
        cpu_us: machine.ticks_to_us(cpu) / n,
    })
}

/// Measure the three floor steps in `dir` (created here).
async fn measure_floor(dir: &Path, n: u32, machine: &Machine) -> anyhow::Result<Floor> {
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let verify = verify_step(dir, n, machine).await?;
    let sign = sign_step(dir, n, machine).await?;
    let append = append_step(dir, n, machine).await?;
    Ok(Floor {
        steps: vec![verify, sign, append],
    })
}

/// (a) One subject-token verify: `jsonwebtoken::decode` of a dev-issuer ES256 token with
/// signature, `exp`, `nbf`, `aud` and `iss` checked.
async fn verify_step(dir: &Path, n: u32, machine: &Machine) -> anyhow::Result<FloorStep> {
    let issuer_dir = dir.join("issuer");
    let dev = DevIssuer::open(&issuer_dir, FLOOR_ISSUER_URL).context("creating a dev issuer")?;
    let token = mint_dev_token(
        &issuer_dir,
        SUBJECT,
        Some("bench-1"),
        TOKEN_TTL_SECS,
        SystemClock.now_unix(),
    )
    .context("minting a dev token")?;
    let jwk: Jwk = serde_json::from_value(dev.jwks()["keys"][0].clone())
        .context("reading the dev issuer's JWK")?;
    let key = DecodingKey::from_jwk(&jwk).context("using the dev issuer's JWK")?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[DEV_AUDIENCE]);
    validation.set_issuer(&[dev.issuer_url()]);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    validation.validate_nbf = true;
    validation.leeway = 30;
    time_steps("verify subject token (ES256)", n, machine, || {
        let r = jsonwebtoken::decode::<Map<String, Value>>(black_box(&token), &key, &validation);
        async move {
            black_box(r.context("the dev token did not verify")?);
            Ok(1)
        }
    })
    .await
}

/// (b) One credential sign: `KeyRing::sign` with an ES256 key, claims shaped like the
/// `jwt` destination's.
async fn sign_step(dir: &Path, n: u32, machine: &Machine) -> anyhow::Result<FloorStep> {
    let ring = KeyRing::open(
        &dir.join("keys"),
        SigningAlgorithm::ES256,
        SystemClock::shared(),
    )
    .context("opening a key ring")?;
    let now = SystemClock.now_unix();
    let workload = format!("spiffe://lanyard.dev/dev/{SUBJECT}");
    let claims = json!({
        "iss": "http://127.0.0.1:7601",
        "sub": workload,
        "aud": "https://dev-api.local",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": GrantId::generate().as_str(),
        "scope": SCOPE,
        "client_id": workload,
        "lanyard": {"grant_id": GrantId::generate().as_str(), "issuer": "dev", "destination": DEV_DESTINATION},
    });
    time_steps("sign credential (ES256)", n, machine, || {
        let r = ring.sign("at+jwt", black_box(&claims));
        async move {
            black_box(r.context("signing failed")?);
            Ok(1)
        }
    })
    .await
}

/// (c) One durable append: a grant and its audit event, [`FLOOR_BATCH`] of each per
/// SQLite transaction (`synchronous=FULL`), timed per item.
async fn append_step(dir: &Path, n: u32, machine: &Machine) -> anyhow::Result<FloorStep> {
    let store = SqliteStore::open(&dir.join("floor.db"))
        .await
        .context("opening a SQLite store")?;
    // Batches are built before timing starts: the floor times the append alone.
    let batches = n.div_ceil(FLOOR_BATCH as u32) as usize + 1;
    let mut batches = (0..batches)
        .map(|_| floor_batch(FLOOR_BATCH))
        .collect::<Vec<_>>()
        .into_iter();
    let store_ref = &store;
    let step = time_steps(
        "durable append (grant + audit, 32/txn)",
        n,
        machine,
        move || {
            let batch = batches.next();
            async move {
                let (grants, events) = batch.context("ran out of prepared batches")?;
                store_ref
                    .grant_insert_batch(&grants, &events)
                    .await
                    .context("inserting a batch")?;
                Ok(u32::try_from(grants.len()).unwrap_or(u32::MAX))
            }
        },
    )
    .await;
    store.close().await;
    step
}

/// `n` grants and their `exchange.granted` events, shaped like the server's.
fn floor_batch(n: usize) -> (Vec<GrantRecord>, Vec<NewAuditEvent>) {
    let now = SystemClock.now_unix();
    let workload = format!("spiffe://lanyard.dev/dev/{SUBJECT}");
    (0..n)
        .map(|_| {
            let id = GrantId::generate();
            let event = NewAuditEvent {
                time_ms: now * 1000,
                kind: "exchange.granted".into(),
                request_id: Some(id.as_str().replacen("grt_", "req_", 1)),
                actor: Some(workload.clone()),
                workload_id: Some(workload.clone()),
                issuer: Some("dev".into()),
                destination: Some(DEV_DESTINATION.into()),
                grant_id: Some(id.to_string()),
                decision: Some("allow".into()),
                detail: json!({"scopes": [SCOPE], "ttl_secs": 300, "expires_at": now + 300, "trust_rule": "dev"}),
                ..NewAuditEvent::default()
            };
            let grant = GrantRecord {
                revocation_handle: format!("jti-{}", id.as_str()),
                id,
                workload_id: workload.clone(),
                issuer: "dev".into(),
                trust_rule: "dev".into(),
                task_id: None,
                destination: DEV_DESTINATION.into(),
                scopes: vec![SCOPE.into()],
                actor_chain: Vec::new(),
                issued_at: now,
                expires_at: now + 300,
                status: GrantStatus::Active,
                finished_at: None,
                renew_count: 0,
            };
            (grant, event)
        })
        .unzip()
}

// === the full path ===

/// What the load run saw.
#[derive(Debug, Clone, Default)]
struct Load {
    /// Successful exchanges in the measured window.
    ok: u64,
    /// Failed exchanges in the measured window.
    failed: u64,
    /// Failed exchanges during the warmup.
    warmup_failed: u64,
    /// The first failure, as `code: message`.
    first_failure: Option<String>,
    /// Latency of every successful measured exchange, microseconds, sorted.
    latencies_us: Vec<u32>,
    /// From the end of the warmup to the last measured answer.
    window: Duration,
    /// Server CPU time over the window, microseconds.
    server_cpu_us: f64,
    /// This process's CPU time over the window, microseconds.
    client_cpu_us: f64,
}

impl Load {
    fn per_sec(&self) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 { self.ok as f64 / s } else { 0.0 }
    }

    fn per_exchange(&self, us: f64) -> f64 {
        if self.ok > 0 {
            us / self.ok as f64
        } else {
            0.0
        }
    }

    /// Cores kept busy on average over the window.
    fn cores(&self, us: f64) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 { us / 1e6 / s } else { 0.0 }
    }

    /// The `p`th percentile (0..=100) by nearest rank, microseconds.
    fn percentile(&self, p: f64) -> u32 {
        percentile(&self.latencies_us, p)
    }

    fn mean_us(&self) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.iter().map(|&l| f64::from(l)).sum::<f64>()
            / self.latencies_us.len() as f64
    }
}

/// Nearest-rank percentile of sorted values; 0 for none.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0)
}

/// What one client task saw.
#[derive(Default)]
struct TaskTally {
    ok: u64,
    failed: u64,
    warmup_failed: u64,
    first_failure: Option<String>,
    latencies_us: Vec<u32>,
}

/// Drive `a.concurrency` clients against the server at `grpc` (process `pid`).
async fn run_load(
    grpc: &str,
    data_dir: &Path,
    pid: u32,
    a: &BenchArgs,
    machine: &Machine,
) -> anyhow::Result<Load> {
    let now = SystemClock.now_unix();
    // The dev trust rule binds grants to the token's `task` claim and requires it.
    let tokens = (1..=TOKENS)
        .map(|i| {
            let task = format!("bench-{i}");
            mint_dev_token(data_dir, SUBJECT, Some(&task), TOKEN_TTL_SECS, now)
        })
        .collect::<Result<Vec<_>, _>>()
        .context("minting dev tokens")?;
    let url = format!("http://{grpc}");
    let concurrency = a.concurrency as usize;
    let mut clients: Vec<ExchangeServiceClient<H2Conn>> = Vec::new();
    for _ in 0..CHANNELS.min(concurrency) {
        clients.push(H2Conn::connect(grpc, &url).await?);
    }

    let start = Instant::now();
    let warm_end = start + Duration::from_secs(a.warmup);
    let end = warm_end + Duration::from_secs(a.duration);
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let Some(client) = clients.get(i % clients.len()).cloned() else {
            anyhow::bail!("no client connection");
        };
        let token = tokens.get(i % tokens.len()).cloned().unwrap_or_default();
        tasks.push(tokio::spawn(client_loop(client, token, warm_end, end)));
    }

    tokio::time::sleep_until(warm_end.into()).await;
    let server_pid = pid.to_string();
    let server0 = cpu_ticks(&server_pid)?;
    let client0 = cpu_ticks("self")?;
    let mut load = Load::default();
    for t in tasks {
        let tally = t.await.context("a client task failed")?;
        load.ok += tally.ok;
        load.failed += tally.failed;
        load.warmup_failed += tally.warmup_failed;
        if load.first_failure.is_none() {
            load.first_failure = tally.first_failure;
        }
        load.latencies_us.extend(tally.latencies_us);
    }
    load.window = warm_end.elapsed();
    let server1 = cpu_ticks(&server_pid)?;
    let client1 = cpu_ticks("self")?;
    load.server_cpu_us = machine.ticks_to_us(server1.saturating_sub(server0));
    load.client_cpu_us = machine.ticks_to_us(client1.saturating_sub(client0));
    load.latencies_us.sort_unstable();
    Ok(load)
}

/// One client: exchange in a loop until `end`, recording exchanges started after
/// `warm_end`.
async fn client_loop(
    mut client: ExchangeServiceClient<H2Conn>,
    token: String,
    warm_end: Instant,
    end: Instant,
) -> TaskTally {
    let mut t = TaskTally::default();
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let r = client
            .exchange(pb::ExchangeRequest {
                subject_token: token.clone(),
                destination: DEV_DESTINATION.into(),
                scopes: vec![SCOPE.into()],
                ..Default::default()
            })
            .await;
        let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
        let failure = match r {
            Ok(resp) if resp.get_ref().credential.is_some() => None,
            Ok(_) => Some("the response carries no credential".to_string()),
            Err(s) => Some(format!("{:?}: {}", s.code(), s.message())),
        };
        match (failure, t0 >= warm_end) {
            (None, true) => {
                t.ok += 1;
                t.latencies_us.push(us);
            }
            (None, false) => {}
            (Some(f), measured) => {
                if measured {
                    t.failed += 1;
                } else {
                    t.warmup_failed += 1;
                }
                t.first_failure.get_or_insert(f);
            }
        }
    }
    t
}

/// The load generator's connection: one bare HTTP/2 connection (hyper), shared by the
/// client tasks given it.
///
/// Not a `tonic` `Channel`: a channel adds a buffer task, reconnection and load
/// balancing, which cost the client CPU on every call, and the client shares the
/// machine with the server. The load generator is kept as lean as dedicated ones
/// (`h2load`, `ghz`) are.
#[derive(Clone)]
struct H2Conn(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl H2Conn {
    async fn connect(addr: &str, url: &str) -> anyhow::Result<ExchangeServiceClient<Self>> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        let origin: http::Uri = url.parse().context("the gRPC URL")?;
        Ok(ExchangeServiceClient::with_origin(Self(send), origin))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Conn {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

// === the report ===

struct Report {
    command: String,
    started_at: String,
    machine: Machine,
    args: BenchArgs,
    channels: usize,
    load: Load,
    floor: Floor,
}

impl Report {
    fn floor_throughput(&self) -> f64 {
        self.floor.throughput(self.machine.nproc)
    }

    fn ratio(&self) -> f64 {
        let f = self.floor_throughput();
        if f > 0.0 {
            self.load.per_sec() / f
        } else {
            0.0
        }
    }

    /// Throughput the server could reach with every core to itself: cores x 1e6 ÷ its
    /// CPU per exchange. Derived, not measured: it assumes the server scales to all cores
    /// once the load generator's share is gone.
    fn server_alone_throughput(&self) -> f64 {
        let cpu = self.load.per_exchange(self.load.server_cpu_us);
        div_or_zero(self.machine.nproc as f64 * 1e6, cpu)
    }

    fn table(&self) -> String {
        let m = &self.machine;
        let l = &self.load;
        let a = &self.args;
        let cores = m.nproc;
        let header = kv_table(&[
            ("command", self.command.clone()),
            ("started", self.started_at.clone()),
            (
                "machine",
                format!(
                    "{} CPUs, {}, Linux {}, CLK_TCK {}",
                    m.nproc, m.cpu_model, m.kernel, m.clk_tck
                ),
            ),
            (
                "server",
                "lanyard serve --dev: embedded SQLite (WAL, synchronous=FULL, group commit), \
                 ES256 subject token in, ES256 credential out"
                    .into(),
            ),
            (
                "load",
                format!(
                    "{} concurrent clients over {} HTTP/2 connections, {}s warmup (discarded), \
                     {}s measured, loopback",
                    a.concurrency, self.channels, a.warmup, a.duration
                ),
            ),
        ]);
        let full = kv_table(&[
            (
                "exchanges",
                format!(
                    "{} ok, {} failed (+{} failed in warmup) in {:.2}s",
                    l.ok,
                    l.failed,
                    l.warmup_failed,
                    l.window.as_secs_f64()
                ),
            ),
            ("throughput", format!("{:.0} exchanges/s", l.per_sec())),
            (
                "latency",
                format!(
                    "p50 {} us, p90 {} us, p99 {} us, max {} us, mean {:.0} us",
                    l.percentile(50.0),
                    l.percentile(90.0),
                    l.percentile(99.0),
                    l.percentile(100.0),
                    l.mean_us()
                ),
            ),
            (
                "server CPU",
                format!(
                    "{:.0} us/exchange ({:.2} of {cores} cores busy)",
                    l.per_exchange(l.server_cpu_us),
                    l.cores(l.server_cpu_us)
                ),
            ),
            (
                "client CPU",
                format!(
                    "{:.0} us/exchange ({:.2} of {cores} cores busy)",
                    l.per_exchange(l.client_cpu_us),
                    l.cores(l.client_cpu_us)
                ),
            ),
        ]);
        let mut rows: Vec<Vec<String>> = self
            .floor
            .steps
            .iter()
            .map(|s| {
                vec![
                    s.name.to_string(),
                    s.iterations.to_string(),
                    format!("{:.1}", s.wall_us),
                    format!("{:.1}", s.cpu_us),
                ]
            })
            .collect();
        rows.push(vec![
            "floor exchange (sum)".into(),
            String::new(),
            format!("{:.1}", self.floor.us_per_exchange()),
            format!("{:.1}", self.floor.cpu_us_per_exchange()),
        ]);
        let floor = list_table(&["step", "ops", "wall us/op", "cpu us/op"], rows);
        let ratio = self.ratio();
        let result = kv_table(&[
            (
                "floor throughput",
                format!(
                    "{:.0} exchanges/s ({cores} cores x 1e6 / {:.1} us)",
                    self.floor_throughput(),
                    self.floor.us_per_exchange()
                ),
            ),
            (
                "server CPU vs floor",
                format!(
                    "{:.1}x the floor's {:.1} us",
                    div_or_zero(
                        l.per_exchange(l.server_cpu_us),
                        self.floor.us_per_exchange()
                    ),
                    self.floor.us_per_exchange()
                ),
            ),
            (
                "server alone (derived)",
                format!(
                    "{:.0} exchanges/s = {:.2} of the floor ({cores} cores x 1e6 / server CPU per exchange; not measured)",
                    self.server_alone_throughput(),
                    div_or_zero(self.server_alone_throughput(), self.floor_throughput()),
                ),
            ),
            (
                "ratio",
                format!(
                    "{ratio:.2} of the floor's throughput (goal >= {GOAL_RATIO}): {}",
                    if ratio >= GOAL_RATIO {
                        "met"
                    } else {
                        "NOT met"
                    }
                ),
            ),
        ]);
        format!(
            "lanyard bench: the exchange path\n{header}\n\n\
             == full path (gRPC Exchange, durable) ==\n{full}\n\n\
             == crypto-only floor (this process, one thread, one op at a time) ==\n{floor}\n\n\
             == result ==\n{result}"
        )
    }

    fn json(&self) -> Value {
        let m = &self.machine;
        let l = &self.load;
        let a = &self.args;
        let steps: Vec<Value> = self
            .floor
            .steps
            .iter()
            .map(|s| {
                json!({
                    "step": s.name,
                    "iterations": s.iterations,
                    "wall_us_per_op": round1(s.wall_us),
                    "cpu_us_per_op": round1(s.cpu_us),
                })
            })
            .collect();
        let ratio = self.ratio();
        json!({
            "command": self.command,
            "started_at": self.started_at,
            "machine": {
                "nproc": m.nproc,
                "cpu_model": m.cpu_model,
                "kernel": m.kernel,
                "clk_tck": m.clk_tck,
            },
            "settings": {
                "duration_secs": a.duration,
                "warmup_secs": a.warmup,
                "concurrency": a.concurrency,
                "connections": self.channels,
                "floor_iterations": a.floor_iterations,
                "floor_batch": FLOOR_BATCH,
            },
            "full_path": {
                "ok": l.ok,
                "failed": l.failed,
                "warmup_failed": l.warmup_failed,
                "first_failure": l.first_failure,
                "window_secs": round_to(l.window.as_secs_f64(), 3),
                "exchanges_per_sec": round1(l.per_sec()),
                "latency_us": {
                    "p50": l.percentile(50.0),
                    "p90": l.percentile(90.0),
                    "p99": l.percentile(99.0),
                    "max": l.percentile(100.0),
                    "mean": round1(l.mean_us()),
                },
                "server_cpu_us_per_exchange": round1(l.per_exchange(l.server_cpu_us)),
                "server_cores_busy": round_to(l.cores(l.server_cpu_us), 2),
                "client_cpu_us_per_exchange": round1(l.per_exchange(l.client_cpu_us)),
                "client_cores_busy": round_to(l.cores(l.client_cpu_us), 2),
            },
            "floor": {
                "steps": steps,
                "us_per_exchange": round1(self.floor.us_per_exchange()),
                "cpu_us_per_exchange": round1(self.floor.cpu_us_per_exchange()),
                "exchanges_per_sec": round1(self.floor_throughput()),
                "cores": m.nproc,
            },
            "server_alone_derived": {
                "exchanges_per_sec": round1(self.server_alone_throughput()),
                "ratio": round_to(div_or_zero(self.server_alone_throughput(), self.floor_throughput()), 3),
            },
            "ratio": round_to(ratio, 3),
            "goal_ratio": GOAL_RATIO,
            "goal_met": ratio >= GOAL_RATIO,
        })
    }
}

/// `x` rounded to `decimals` places, for JSON.
fn round_to(x: f64, decimals: i32) -> f64 {
    let m = 10f64.powi(decimals);
    (x * m).round() / m
}

fn round1(x: f64) -> f64 {
    round_to(x, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_is_utime_plus_stime_even_with_spaces_in_the_name() {
        let line = "4242 (lanyard (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    150 25 0 0 20 0 9 0 123456 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_cpu(line), Some(175));
        assert_eq!(parse_stat_cpu("4242 (short) S 1"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn floor_throughput_counts_every_core() {
        let f = Floor {
            steps: vec![
                FloorStep {
                    name: "a",
                    iterations: 1,
                    wall_us: 60.0,
                    cpu_us: 60.0,
                },
                FloorStep {
                    name: "b",
                    iterations: 1,
                    wall_us: 40.0,
                    cpu_us: 40.0,
                },
            ],
        };
        assert_eq!(f.us_per_exchange(), 100.0);
        assert_eq!(f.throughput(2), 20_000.0);
    }
}
