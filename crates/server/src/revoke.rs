//! Revoke everywhere: durable revocation jobs, the outbox worker that fans them out to
//! destinations, signed receipts, deny entries, and following a job as it runs.
//!
//! ## The flow
//! 1. [`Runtime::revoke_start`] writes the job in one store transaction: the job row, one
//!    step per matched grant (active and unexpired), those grants marked `revoked` (so
//!    Renew, Release and introspection refuse them from that commit on), the deny entry
//!    if asked, and the `revocation.requested` audit event. Nothing has been sent yet.
//! 2. A worker ([`run_worker`], one per server) takes the job's lease and works through
//!    its steps per destination, each destination in its own task, so a destination that
//!    is down never holds up the others. Calls are concurrent within a destination
//!    ([`PER_DESTINATION_CONCURRENCY`]), each bounded by [`CALL_TIMEOUT`]; after
//!    [`BREAKER_THRESHOLD`] retryable failures in a row the rest of that destination's
//!    due steps are marked failed without calling it (a circuit breaker), and retried
//!    later with exponential backoff.
//! 3. Each page of results becomes receipts, one per run of steps with the same outcome,
//!    signed by lanyard (a JWS, typ [`RECEIPT_TYP`]) and stored with their steps' new
//!    state and a `revocation.receipt` audit event in one transaction, fenced by the
//!    lease. A worker that lost its lease writes nothing.
//! 4. When no step is pending or failed the job is `done` (`revocation.completed`).
//!
//! ## Crashes
//! Nothing is in memory only. A worker killed mid-job leaves its lease to lapse
//! ([`RevocationSettings::lease`]); the next worker (the restarted server, or another
//! replica) takes the job and continues with the steps not yet recorded. A step whose
//! call succeeded but whose receipt was not committed is called again: adapter revokes
//! are idempotent, so the second call only confirms.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lanyard_audit::kinds;
use lanyard_core::ReasonCode;
use lanyard_destination::{DestinationError, RevokeOutcome, RevokeRequest};
use lanyard_store::{
    ConfigKind, DestinationProgress, JobState, NewAuditEvent, NewConfigObject, NewRevocationJob,
    RevocationJob, RevocationReceiptRecord, RevocationStep, RevokeSelector, StepState, StoreError,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Notify, watch};
use tracing::Instrument;

use crate::error::ApiError;
use crate::runtime::{RequestCtx, Runtime, truncate};

/// JOSE `typ` of a signed revocation receipt.
pub const RECEIPT_TYP: &str = "lanyard-revocation-receipt+jwt";
/// Steps read per page.
pub const PAGE: u32 = 5000;
/// Concurrent adapter calls per destination.
pub const PER_DESTINATION_CONCURRENCY: usize = 16;
/// The longest one adapter revoke call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Retryable failures in a row after which a destination is not called again in this
/// pass.
pub const BREAKER_THRESHOLD: usize = 5;
/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest deny entry an operator may set with a revocation (a year); an issuer kill
/// switch has none.
pub const MAX_DENY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Tunables (`[revocation]` in the config file).
#[derive(Debug, Clone)]
pub struct RevocationSettings {
    /// How long a worker's lease on a job lasts without renewal; after a crash the job
    /// resumes within this time.
    pub lease: Duration,
    /// How often an idle worker looks for due jobs written by other replicas (jobs
    /// written here wake it at once).
    pub poll: Duration,
    /// How often expired grants are swept (marked expired; those of destinations that
    /// leave state behind are revoked there first, see [`expiry_cleanup`]).
    pub expiry_sweep: Duration,
}

impl Default for RevocationSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            poll: Duration::from_secs(1),
            expiry_sweep: Duration::from_secs(30),
        }
    }
}

/// Shared revocation state of one server.
pub struct Revocations {
    /// Who this worker is, in leases (`<host>:<pid>:<random>`).
    pub owner: String,
    /// Tunables.
    pub settings: std::sync::RwLock<RevocationSettings>,
    /// Wakes the worker when a job is written here.
    wake: Notify,
    /// Bumped after every receipt write or job state change here, so followers look.
    changed: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "lanyard".into());
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self {
            owner: format!("{host}:{}:{}", std::process::id(), &random[..8]),
            settings: std::sync::RwLock::new(RevocationSettings::default()),
            wake: Notify::new(),
            changed: watch::channel(0).0,
        }
    }
}

impl Revocations {
    /// The settings in force.
    pub fn settings(&self) -> RevocationSettings {
        match self.settings.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the settings.
    pub fn set_settings(&self, s: RevocationSettings) {
        match self.settings.write() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// A deny entry as stored (`ConfigKind::DenyEntry`, named `<kind>:<value>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyEntry {
    /// `workload`, `workload_prefix`, `issuer` or `destination`.
    pub kind: String,
    /// The workload ID, prefix, issuer name or destination name.
    pub value: String,
    /// Why.
    pub reason: String,
    /// The job that wrote it.
    pub job_id: String,
    /// Created, seconds.
    pub created_at: i64,
    /// Expires, seconds; `None` = until lifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Who asked.
    pub created_by: String,
}

impl DenyEntry {
    /// The stored name.
    pub fn name(&self) -> String {
        format!("{}:{}", self.kind, self.value)
    }

    /// Whether it is in force at `now`.
    pub fn active(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }

    /// The refusal, if this entry covers a workload proved by `issuer`. The message
    /// names the entry (the operator's handle) but not why, until when, or which job:
    /// the caller may be the one it is meant to stop.
    pub fn refuses(&self, workload: &str, issuer: &str, now: i64) -> Option<ApiError> {
        if !self.active(now) {
            return None;
        }
        let hit = match self.kind.as_str() {
            "workload" => workload == self.value,
            "workload_prefix" => workload.starts_with(&self.value),
            "issuer" => issuer == self.value,
            _ => false,
        };
        if !hit {
            return None;
        }
        Some(if self.kind == "issuer" {
            ApiError::new(
                ReasonCode::IssuerDistrusted,
                format!("issuer {} is distrusted by an operator", self.value),
            )
        } else {
            ApiError::new(
                ReasonCode::WorkloadDenied,
                format!(
                    "workload {workload} is denied by an operator (deny entry {})",
                    self.name()
                ),
            )
        })
    }

    /// The refusal, if this entry disables `destination` (its kill switch).
    pub fn refuses_destination(&self, destination: &str, now: i64) -> Option<ApiError> {
        (self.kind == "destination" && self.value == destination && self.active(now)).then(|| {
            ApiError::new(
                ReasonCode::DestinationDisabled,
                format!(
                    "destination {destination} is disabled by an operator (deny entry {})",
                    self.name()
                ),
            )
        })
    }

    /// This entry merged with the one it replaces: the longer denial wins (no expiry is
    /// longest), so a later, shorter `--deny-for` never shortens a kill switch.
    pub fn merged_with(mut self, earlier: &DenyEntry, now: i64) -> Self {
        if earlier.active(now) {
            self.expires_at = match (earlier.expires_at, self.expires_at) {
                (None, _) | (_, None) => None,
                (Some(a), Some(b)) => Some(a.max(b)),
            };
        }
        self
    }
}

/// What an operator asks.
#[derive(Debug, Clone)]
pub struct RevokeInput {
    /// Which grants.
    pub selector: RevokeSelector,
    /// Why (required).
    pub reason: String,
    /// Deny new exchanges of the selected workload / prefix / issuer / destination for
    /// this long; `Some(None)` = until lifted (the issuer and destination kill switches).
    pub deny: Option<Option<Duration>>,
    /// Match active grants that have expired instead (the expiry clean-up; see
    /// [`NewRevocationJob::expired_only`]).
    pub expired_only: bool,
}

impl Runtime {
    /// Validate, write the job durably (see the module docs), and wake the worker.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad selector, reason or deny request;
    /// `STORE_UNAVAILABLE`.
    pub async fn revoke_start(
        &self,
        input: RevokeInput,
        ctx: &RequestCtx,
    ) -> Result<(RevocationJob, Option<String>), ApiError> {
        let value = input.selector.value();
        if value.is_empty() || value.len() > 1024 || value.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "the {} selector needs a value of 1-1024 printable characters",
                input.selector.kind()
            )));
        }
        if let RevokeSelector::Grant(id) = &input.selector
            && lanyard_core::GrantId::parse(id).is_err()
        {
            return Err(ApiError::new(
                ReasonCode::GrantNotFound,
                format!("{:?} is not a grant ID (grt_...)", truncate(id)),
            ));
        }
        let reason = input.reason.trim();
        if reason.is_empty() {
            return Err(ApiError::invalid(
                "a reason is required; it is recorded in the audit stream and the receipts",
            ));
        }
        if reason.len() > 1024 {
            return Err(ApiError::invalid("the reason is longer than 1024 bytes"));
        }
        let now = self.clock.now_unix();
        let now_ms = self.clock.now_unix_millis();
        let id = format!("rvk_{}", uuid::Uuid::now_v7().simple());
        let requested_by = ctx.operator.clone().unwrap_or_else(|| "lanyard".into());
        let deny = match input.deny {
            None => None,
            Some(_)
                if !matches!(
                    input.selector,
                    RevokeSelector::Workload(_)
                        | RevokeSelector::WorkloadPrefix(_)
                        | RevokeSelector::Issuer(_)
                        | RevokeSelector::Destination(_)
                ) =>
            {
                return Err(ApiError::invalid(
                    "a deny entry needs a workload, workload_prefix, issuer or destination selector",
                ));
            }
            Some(Some(d)) if d.is_zero() || d > MAX_DENY => {
                return Err(ApiError::invalid(format!(
                    "deny_seconds must be 1..={}",
                    MAX_DENY.as_secs()
                )));
            }
            Some(d) => Some(DenyEntry {
                kind: input.selector.kind().to_owned(),
                value: value.to_owned(),
                reason: reason.to_owned(),
                job_id: id.clone(),
                created_at: now,
                expires_at: d.map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(0))),
                created_by: requested_by.clone(),
            }),
        };
        let mut ev = self.event_for(kinds::REVOCATION_REQUESTED, ctx);
        ev.decision = Some("revoke".into());
        match &input.selector {
            RevokeSelector::Grant(g) => ev.grant_id = Some(g.clone()),
            RevokeSelector::Task(t) => ev.task_id = Some(t.clone()),
            RevokeSelector::Workload(w) => ev.workload_id = Some(w.clone()),
            RevokeSelector::Issuer(i) => ev.issuer = Some(i.clone()),
            RevokeSelector::Destination(d) => ev.destination = Some(d.clone()),
            RevokeSelector::WorkloadPrefix(_) => {}
        }
        ev.detail = json!({
            "job_id": id,
            "selector": {"kind": input.selector.kind(), "value": value},
            "reason": reason,
        });
        if input.expired_only {
            ev.detail["expired_only"] = json!(true);
        }
        let deny = deny.map(
            |d| match self.snapshot().deny.iter().find(|e| e.name() == d.name()) {
                Some(earlier) => d.merged_with(earlier, now),
                None => d,
            },
        );
        if let Some(d) = &deny {
            ev.detail["deny_entry"] = json!({"name": d.name(), "expires_at": d.expires_at});
        }
        let deny_obj = match &deny {
            Some(d) => Some(NewConfigObject {
                kind: ConfigKind::DenyEntry,
                name: d.name(),
                spec: serde_json::to_value(d).map_err(|e| ApiError::internal(&e))?,
                updated_by: requested_by.clone(),
                now,
            }),
            None => None,
        };
        let job = NewRevocationJob {
            id,
            selector: input.selector,
            reason: reason.to_owned(),
            requested_by,
            now,
            now_ms,
            expired_only: input.expired_only,
            // Grants other replicas issue before their next configuration poll shows them
            // the deny entry are taken into the job by a sweep, which the job waits for.
            sweep_at_ms: deny
                .is_some()
                .then(|| now_ms.saturating_add(lease_ms(SWEEP_DELAY))),
        };
        let created = self
            .store
            .revocation_create(&job, deny_obj, ev)
            .instrument(crate::telemetry::store_commit_span("revocation.create"))
            .await?;
        tracing::info!(
            job = %created.id,
            selector = %created.selector,
            matched = created.matched,
            "revocation job written"
        );
        if deny.is_some() {
            // Enforce the deny entry here at once; other replicas pick it up with their
            // next configuration poll.
            if let Err(e) = self.reload(false).await {
                tracing::warn!(error = %e.message, "reloading after a deny entry failed");
            }
        }
        self.revocations.wake.notify_one();
        self.revocations.bump();
        Ok((created, deny.map(|d| d.name())))
    }

    /// The refusal from an active deny entry covering this workload or issuer, if any.
    pub fn deny_check(&self, workload: &str, issuer: &str) -> Option<ApiError> {
        let now = self.clock.now_unix();
        self.snapshot()
            .deny
            .iter()
            .find_map(|d| d.refuses(workload, issuer, now))
    }

    /// As [`Runtime::deny_check`], and also the refusal if an operator disabled
    /// `destination` (its kill switch); one snapshot, workload and issuer entries first.
    pub fn grant_deny_check(
        &self,
        workload: &str,
        issuer: &str,
        destination: &str,
    ) -> Option<ApiError> {
        let now = self.clock.now_unix();
        let snap = self.snapshot();
        snap.deny
            .iter()
            .find_map(|d| d.refuses(workload, issuer, now))
            .or_else(|| {
                snap.deny
                    .iter()
                    .find_map(|d| d.refuses_destination(destination, now))
            })
    }

    /// Lift a deny entry.
    ///
    /// # Errors
    /// `NOT_FOUND`; `STORE_UNAVAILABLE`.
    pub async fn deny_lift(&self, name: &str, ctx: &RequestCtx) -> Result<(), ApiError> {
        let Some(obj) = self.store.config_get(ConfigKind::DenyEntry, name).await? else {
            return Err(ApiError::new(
                ReasonCode::NotFound,
                format!("no deny entry named {:?}", truncate(name)),
            ));
        };
        let mut ev = self.event_for(&kinds::config_delete("deny_entry"), ctx);
        ev.detail = json!({"name": name, "before": obj.spec});
        self.store
            .config_delete(ConfigKind::DenyEntry, name, ev)
            .await?;
        self.reload(false).await?;
        Ok(())
    }

    /// Wait until something about revocations changed here, or `timeout` passed.
    pub async fn revocation_changed(&self, rx: &mut watch::Receiver<u64>, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    /// A receiver for [`Runtime::revocation_changed`].
    pub fn revocation_watch(&self) -> watch::Receiver<u64> {
        self.revocations.changed.subscribe()
    }
}

/// Revoke, at every destination whose adapter asks for it
/// ([`lanyard_destination::Destination::revoke_at_expiry`]), the grants that expired:
/// one job per destination that has any, with receipts like any other.
pub async fn expiry_cleanup(rt: &Runtime) {
    let snap = rt.snapshot();
    let mut names: Vec<&String> = snap
        .destinations
        .iter()
        .filter(|(_, d)| d.adapter.revoke_at_expiry())
        .map(|(n, _)| n)
        .collect();
    names.sort();
    for name in names {
        let ctx = RequestCtx {
            request_id: uuid::Uuid::new_v4().simple().to_string(),
            operator: Some("lanyard:expiry".into()),
        };
        let input = RevokeInput {
            selector: RevokeSelector::Destination(name.clone()),
            reason: "expired: remove the credential left at the destination".into(),
            deny: None,
            expired_only: true,
        };
        match rt.revoke_start(input, &ctx).await {
            Ok((job, _)) => {
                tracing::info!(job = %job.id, destination = %name, grants = job.matched, "revoking expired grants at their destination")
            }
            Err(e) if e.reason == ReasonCode::NotFound => {}
            Err(e) => {
                tracing::warn!(destination = %name, error = %e.message, "the expiry clean-up could not start; retried at the next sweep")
            }
        }
    }
}

/// The stored destinations whose kind is revoked at expiry
/// ([`crate::registry::REVOKED_AT_EXPIRY`]): the plain expiry sweep leaves their grants
/// to [`expiry_cleanup`].
///
/// # Errors
/// When the store cannot be read.
pub async fn kept_at_expiry(rt: &Runtime) -> Result<Vec<String>, StoreError> {
    Ok(rt
        .store
        .config_list(ConfigKind::Destination)
        .await?
        .into_iter()
        .filter(|o| {
            o.spec
                .get("kind")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|k| crate::registry::REVOKED_AT_EXPIRY.contains(&k))
        })
        .map(|o| o.name)
        .collect())
}

/// How long after a deny entry is written its job sweeps for stragglers: every replica
/// reloads its configuration (and so its deny entries) at least this often, twice over.
pub const SWEEP_DELAY: Duration = Duration::from_secs(5);

/// Run the revocation worker until `shutdown` resolves: take due jobs (written here,
/// by another replica, or left by a crashed worker) and work them.
pub async fn run_worker(rt: Arc<Runtime>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let settings = rt.revocations.settings();
        let now_ms = rt.clock.now_unix_millis();
        let claimed = rt
            .store
            .revocation_claim(
                &rt.revocations.owner,
                now_ms,
                now_ms.saturating_add(lease_ms(settings.lease)),
            )
            .await;
        match claimed {
            Ok(Some(job)) => {
                let id = job.id.clone();
                let span = tracing::info_span!("revocation.job", job = %id);
                if let Err(e) = work_job(&rt, job).instrument(span).await {
                    tracing::warn!(job = %id, error = %e, "revocation pass ended early; it resumes when its lease lapses");
                }
                rt.revocations.bump();
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "looking for revocation jobs failed"),
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = rt.revocations.wake.notified() => {}
            () = tokio::time::sleep(settings.poll) => {}
        }
    }
}

/// One pass over a leased job: every destination with due steps, concurrently; then
/// give the lease back (the job is done, or due again at its next retry).
async fn work_job(rt: &Arc<Runtime>, job: RevocationJob) -> Result<(), StoreError> {
    if let Some(at) = job.sweep_at_ms
        && at <= rt.clock.now_unix_millis()
    {
        let added = rt
            .store
            .revocation_sweep(&rt.revocations.owner, &job.id, rt.clock.now_unix())
            .await?;
        if added > 0 {
            tracing::warn!(job = %job.id, added, "the sweep took in grants issued while the deny entry was propagating");
        }
    }
    let destinations = rt.store.revocation_destinations(&job.id).await?;
    let lease = rt.revocations.settings().lease;
    let next_seq = Arc::new(Mutex::new(job.receipts + 1));
    // Keep the lease while destinations are slow.
    let heartbeat = {
        let rt = rt.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let until = rt.clock.now_unix_millis().saturating_add(lease_ms(lease));
                if let Err(e) = rt
                    .store
                    .revocation_record(&rt.revocations.owner, &id, until, &[], &[])
                    .await
                {
                    // Keep trying: a transient store error must not let the lease lapse;
                    // a lost lease (Conflict) ends the pass at its next write anyway.
                    tracing::warn!(job = %id, error = %e, "renewing the revocation lease failed");
                    if matches!(e, StoreError::Conflict(_)) {
                        return;
                    }
                }
            }
        })
    };
    let job = Arc::new(job);
    // A destination with nothing due finds an empty first page and ends at once.
    let tasks = destinations
        .into_iter()
        .map(|d| work_destination(rt.clone(), job.clone(), d, next_seq.clone()));
    let results = futures::future::join_all(tasks).await;
    heartbeat.abort();
    for r in results {
        r?;
    }
    let mut done = NewAuditEvent {
        time_ms: rt.clock.now_unix_millis(),
        kind: kinds::REVOCATION_COMPLETED.into(),
        actor: Some(job.requested_by.clone()),
        decision: Some("revoke".into()),
        ..NewAuditEvent::default()
    };
    done.detail = json!({"job_id": job.id, "matched": job.matched});
    let after = rt
        .store
        .revocation_release(
            &rt.revocations.owner,
            &job.id,
            rt.clock.now_unix_millis(),
            done,
        )
        .await?;
    if after.state == JobState::Done {
        tracing::info!(job = %job.id, matched = job.matched, "revocation job done");
    }
    Ok(())
}

fn lease_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What happened to one step.
struct StepOutcome {
    state: StepState,
    detail: String,
    expires_at: Option<i64>,
    retry_at_ms: Option<i64>,
}

/// Work through one destination's due steps of a job, a page at a time. Results are
/// recorded as they complete (whatever is ready, in one transaction), so one slow grant
/// never holds back the receipts of the others.
async fn work_destination(
    rt: Arc<Runtime>,
    job: Arc<RevocationJob>,
    destination: String,
    next_seq: Arc<Mutex<i64>>,
) -> Result<(), StoreError> {
    let snap = rt.snapshot();
    let entry = snap.destinations.get(&destination).cloned();
    // For this pass: once open it stays open past any pass (the cool-down is the longest
    // retry delay), so the rest of the destination's steps are not called.
    let breaker = Arc::new(lanyard_destination::http::CircuitBreaker::new(
        &format!("destination {destination}"),
        u32::try_from(BREAKER_THRESHOLD).unwrap_or(u32::MAX),
        MAX_BACKOFF,
        rt.clock.clone(),
    ));
    // The next page is read while this one is worked: reads run beside the one writer.
    let fetch = |after: String| {
        let store = rt.store.clone();
        let (job_id, destination) = (job.id.clone(), destination.clone());
        let now_ms = rt.clock.now_unix_millis();
        tokio::spawn(async move {
            store
                .revocation_steps_due(&job_id, &destination, now_ms, &after, PAGE)
                .await
        })
    };
    let mut next = fetch(String::new());
    loop {
        let steps = match next.await {
            Ok(r) => r?,
            Err(e) => return Err(StoreError::Unavailable(Box::new(e))),
        };
        let Some(last) = steps.last() else {
            return Ok(());
        };
        next = fetch(last.grant_id.clone());
        let Some(entry) = &entry else {
            // Deleted, or stored but not loaded here (its settings did not build on this
            // server, or it is newer than this server's configuration): only a deleted
            // one is final.
            let stored = rt
                .store
                .config_get(ConfigKind::Destination, &destination)
                .await?
                .is_some();
            let now_ms = rt.clock.now_unix_millis();
            let outcomes = steps
                .iter()
                .map(|s| {
                    if stored {
                        failed(
                            s,
                            "the destination is configured but not loaded on this server (see its log); retried".into(),
                            now_ms,
                        )
                    } else {
                        StepOutcome {
                            state: StepState::ExpiresAt,
                            detail: "the destination was deleted; the credential expires by itself".into(),
                            expires_at: Some(s.expires_at),
                            retry_at_ms: None,
                        }
                    }
                })
                .collect();
            record(&rt, &job, &destination, &steps, outcomes, &next_seq).await?;
            continue;
        };
        let adapter = entry.adapter.clone();
        let now = rt.clock.now_unix();
        let span = crate::telemetry::revoke_span(&entry.spec.name, &entry.spec.kind);
        let mut results = futures::stream::iter(steps.into_iter().map(|s| {
            let adapter = adapter.clone();
            let breaker = breaker.clone();
            async move {
                let r = match breaker.permit() {
                    Err(open) => Attempt::Skipped(open.to_string()),
                    Ok(permit) => {
                        let r = revoke_one(adapter, s.clone(), now).await;
                        permit.record(&r);
                        Attempt::Done(r)
                    }
                };
                (s, r)
            }
        }))
        .buffer_unordered(PER_DESTINATION_CONCURRENCY)
        .ready_chunks(PAGE as usize);
        while let Some(chunk) = results.next().instrument(span.clone()).await {
            let now_ms = rt.clock.now_unix_millis();
            let mut done = Vec::with_capacity(chunk.len());
            let mut outcomes = Vec::with_capacity(chunk.len());
            let mut deferred: Vec<RevocationStep> = Vec::new();
            for (s, r) in chunk {
                let outcome = match r {
                    // Already failed and said why in a receipt: only its retry time moves.
                    Attempt::Skipped(_) if s.state == StepState::Failed => {
                        deferred.push(s);
                        continue;
                    }
                    Attempt::Skipped(err) => failed(
                        &s,
                        format!("not attempted: the destination is failing ({err})"),
                        now_ms,
                    ),
                    Attempt::Done(Ok(RevokeOutcome::Revoked { detail })) => StepOutcome {
                        state: StepState::Revoked,
                        detail,
                        expires_at: None,
                        retry_at_ms: None,
                    },
                    // The credential exists until its expiry; the receipt says when.
                    Attempt::Done(Ok(RevokeOutcome::Blocked { detail })) => StepOutcome {
                        state: StepState::Blocked,
                        detail,
                        expires_at: Some(s.expires_at),
                        retry_at_ms: None,
                    },
                    Attempt::Done(Ok(RevokeOutcome::ExpiresAt { at, detail })) => StepOutcome {
                        state: StepState::ExpiresAt,
                        detail,
                        expires_at: Some(at),
                        retry_at_ms: None,
                    },
                    Attempt::Done(Err(e)) => {
                        let retryable = matches!(
                            e,
                            DestinationError::Upstream {
                                retryable: true,
                                ..
                            }
                        );
                        failed_with(&s, e.to_string(), now_ms, retryable)
                    }
                };
                outcomes.push(outcome);
                done.push(s);
            }
            if !done.is_empty() {
                record(&rt, &job, &destination, &done, outcomes, &next_seq).await?;
            }
            if let Some(first) = deferred.first() {
                let retry_at = failed(first, String::new(), now_ms)
                    .retry_at_ms
                    .unwrap_or(now_ms);
                let ids: Vec<String> = deferred.iter().map(|s| s.grant_id.clone()).collect();
                rt.store
                    .revocation_defer(&rt.revocations.owner, &job.id, &destination, &ids, retry_at)
                    .await?;
            }
        }
    }
}

/// One step's call in a pass.
enum Attempt {
    /// The destination's breaker was open: not called (why).
    Skipped(String),
    /// Called.
    Done(Result<RevokeOutcome, DestinationError>),
}

/// One adapter call, bounded by [`CALL_TIMEOUT`].
async fn revoke_one(
    adapter: Arc<dyn lanyard_destination::Destination>,
    s: RevocationStep,
    now: i64,
) -> Result<RevokeOutcome, DestinationError> {
    let Ok(gid) = lanyard_core::GrantId::parse(&s.grant_id) else {
        return Err(DestinationError::BadRequest(format!(
            "stored grant ID {:?} is malformed",
            s.grant_id
        )));
    };
    let call = adapter.revoke(RevokeRequest {
        grant_id: &gid,
        revocation_handle: &s.revocation_handle,
        workload_id: &s.workload_id,
        expires_at: s.expires_at,
        now,
    });
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(DestinationError::Upstream {
            message: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
            retryable: true,
        }),
    }
}

/// A failed step, retried after exponential backoff from its attempts so far; an error
/// the destination says will not go away by itself waits the longest backoff.
fn failed(step: &RevocationStep, detail: String, now_ms: i64) -> StepOutcome {
    failed_with(step, detail, now_ms, true)
}

fn failed_with(step: &RevocationStep, detail: String, now_ms: i64, retryable: bool) -> StepOutcome {
    let exp = u32::try_from(step.attempts.clamp(0, 16)).unwrap_or(16);
    let backoff = if retryable {
        FIRST_BACKOFF
            .saturating_mul(2u32.saturating_pow(exp))
            .min(MAX_BACKOFF)
    } else {
        MAX_BACKOFF
    };
    StepOutcome {
        state: StepState::Failed,
        detail,
        expires_at: None,
        retry_at_ms: Some(now_ms.saturating_add(lease_ms(backoff))),
    }
}

/// Group a page's outcomes into receipts (runs of the same outcome and detail), sign
/// them, and store them with their audit events.
async fn record(
    rt: &Runtime,
    job: &RevocationJob,
    destination: &str,
    steps: &[RevocationStep],
    outcomes: Vec<StepOutcome>,
    next_seq: &Mutex<i64>,
) -> Result<(), StoreError> {
    struct Group<'a> {
        outcome: StepOutcome,
        steps: Vec<&'a RevocationStep>,
    }
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (step, o) in steps.iter().zip(outcomes) {
        match groups.iter_mut().find(|g| {
            g.outcome.state == o.state
                && g.outcome.detail == o.detail
                && g.outcome.retry_at_ms.is_some() == o.retry_at_ms.is_some()
        }) {
            Some(g) => {
                g.outcome.expires_at = g.outcome.expires_at.max(o.expires_at);
                g.outcome.retry_at_ms = g.outcome.retry_at_ms.max(o.retry_at_ms);
                g.steps.push(step);
            }
            None => groups.push(Group {
                outcome: o,
                steps: vec![step],
            }),
        }
    }
    // One writer at a time per job, so receipts commit in `seq` order and a follower
    // reading "after seq n" never skips one.
    let mut seq = next_seq.lock().await;
    let created_at_ms = rt.clock.now_unix_millis();
    let mut receipts = Vec::with_capacity(groups.len());
    let mut events = Vec::with_capacity(groups.len());
    for g in &groups {
        let grant_ids: Vec<String> = g.steps.iter().map(|s| s.grant_id.clone()).collect();
        let claims = json!({
            "iss": rt.minter.issuer_url(),
            "iat": created_at_ms / 1000,
            "job_id": job.id,
            "seq": *seq,
            "selector": {"kind": job.selector.kind(), "value": job.selector.value()},
            "reason": job.reason,
            "destination": destination,
            "outcome": g.outcome.state.as_str(),
            "grant_ids": grant_ids,
            "expires_at": g.outcome.expires_at,
            "retry_at_ms": g.outcome.retry_at_ms,
            "detail": g.outcome.detail,
        });
        let signature = rt
            .minter
            .mint(&claims, RECEIPT_TYP)
            .map_err(|e| StoreError::Unavailable(format!("signing a receipt: {e}").into()))?
            .expose()
            .to_owned();
        let mut ev = NewAuditEvent {
            time_ms: created_at_ms,
            kind: kinds::REVOCATION_RECEIPT.into(),
            actor: Some(job.requested_by.clone()),
            destination: Some(destination.to_owned()),
            decision: Some("revoke".into()),
            ..NewAuditEvent::default()
        };
        if let [one] = g.steps.as_slice() {
            ev.grant_id = Some(one.grant_id.clone());
        }
        if let Some(first) = g.steps.first()
            && g.steps.iter().all(|s| s.workload_id == first.workload_id)
        {
            ev.workload_id = Some(first.workload_id.clone());
        }
        if g.outcome.state == StepState::Failed {
            ev.reason = Some(ReasonCode::DestinationFailed.as_str().into());
        }
        ev.detail = json!({
            "job_id": job.id,
            "receipt_seq": *seq,
            "outcome": g.outcome.state.as_str(),
            "grants": grant_ids.len(),
            "expires_at": g.outcome.expires_at,
            "retry_at_ms": g.outcome.retry_at_ms,
            "detail": g.outcome.detail,
            "receipt_sha256": hex::encode(Sha256::digest(signature.as_bytes())),
        });
        events.push(ev);
        receipts.push(RevocationReceiptRecord {
            job_id: job.id.clone(),
            seq: *seq,
            destination: destination.to_owned(),
            outcome: g.outcome.state,
            grant_ids,
            expires_at: g.outcome.expires_at,
            detail: g.outcome.detail.clone(),
            created_at_ms,
            signature,
            retry_at_ms: g.outcome.retry_at_ms,
        });
        *seq += 1;
    }
    let until = rt
        .clock
        .now_unix_millis()
        .saturating_add(lease_ms(rt.revocations.settings().lease));
    let written = rt
        .store
        .revocation_record(&rt.revocations.owner, &job.id, until, &receipts, &events)
        .instrument(crate::telemetry::store_commit_span("revocation.record"))
        .await;
    // On an error the numbers are not handed back: the commit may have happened with
    // only its acknowledgement lost, and a gap in `seq` is harmless to followers.
    written?;
    drop(seq);
    for r in &receipts {
        rt.metrics
            .revocation_grants(&r.destination, r.outcome.as_str(), r.grant_ids.len());
    }
    rt.revocations.bump();
    Ok(())
}

/// Step counts summed over a job's destinations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Confirmed revoked.
    pub revoked: u64,
    /// Blocked by a deny rule at the destination.
    pub blocked: u64,
    /// Lapse at expiry.
    pub expires_at: u64,
    /// Failed, being retried.
    pub failed: u64,
    /// Not yet attempted.
    pub pending: u64,
}

/// Totals over a job's destinations.
pub fn totals(progress: &[DestinationProgress]) -> Totals {
    progress.iter().fold(Totals::default(), |t, p| Totals {
        revoked: t.revoked + p.revoked,
        blocked: t.blocked + p.blocked,
        expires_at: t.expires_at + p.expires_at,
        failed: t.failed + p.failed,
        pending: t.pending + p.pending,
    })
}

/// A stream of revocation events, as Revoke, WatchRevocation and DistrustIssuer return.
pub type RevokeStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<lanyard_proto::v1::RevokeEvent, tonic::Status>> + Send>,
>;

/// Receipts read per store call while following.
const FOLLOW_PAGE: u32 = 200;

/// Follow a job: `job` first, then every receipt from the first one as it is written,
/// then a summary: once no step is pending (every grant attempted once; failed ones are
/// still being retried), or with `until_done` once the job is done (every step final).
/// Reads the store, so it follows work done by any replica; woken by this server's
/// writes and otherwise polls every half second. Ends early when the client goes away.
pub fn follow(
    rt: Arc<Runtime>,
    job: lanyard_proto::v1::RevocationJob,
    until_done: bool,
) -> RevokeStream {
    use lanyard_proto::v1 as pb;
    use pb::revoke_event::Event;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::RevokeEvent, tonic::Status>>(64);
    tokio::spawn(async move {
        let id = job.id.clone();
        let send = |e: Event| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(pb::RevokeEvent { event: Some(e) }))
                    .await
                    .is_ok()
            }
        };
        if !send(Event::Job(job)).await {
            return;
        }
        let fail = |e: StoreError| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Err(ApiError::from(e).into())).await;
            }
        };
        let mut watch = rt.revocation_watch();
        let mut after = 0i64;
        loop {
            // Every receipt written so far.
            let mut got = 0usize;
            loop {
                match rt.store.revocation_receipts(&id, after, FOLLOW_PAGE).await {
                    Ok(rs) => {
                        let n = rs.len();
                        got += n;
                        for r in rs {
                            after = r.seq;
                            if !send(Event::Receipt(crate::convert::job_receipt_to_pb(&r))).await {
                                return;
                            }
                        }
                        if n < FOLLOW_PAGE as usize {
                            break;
                        }
                    }
                    Err(e) => return fail(e).await,
                }
            }
            // While receipts keep coming the job is busy; look at the counts once quiet.
            if got == 0 {
                let progress = match rt.store.revocation_progress(&id).await {
                    Ok(p) => p,
                    Err(e) => return fail(e).await,
                };
                let finished = if until_done {
                    match rt.store.revocation_get(&id).await {
                        Ok(j) => j.is_none_or(|j| j.state == JobState::Done),
                        Err(e) => return fail(e).await,
                    }
                } else {
                    progress.iter().all(|p| p.pending == 0)
                };
                if finished {
                    // Receipts committed between the two reads come first.
                    match rt.store.revocation_receipts(&id, after, u32::MAX).await {
                        Ok(rs) => {
                            for r in rs {
                                if !send(Event::Receipt(crate::convert::job_receipt_to_pb(&r)))
                                    .await
                                {
                                    return;
                                }
                            }
                        }
                        Err(e) => return fail(e).await,
                    }
                    let Totals {
                        revoked,
                        blocked,
                        expires_at,
                        failed,
                        ..
                    } = totals(&progress);
                    // Running while failed steps are retried or a sweep is still due.
                    let state = match rt.store.revocation_get(&id).await {
                        Ok(Some(j)) if j.state == JobState::Done => "done",
                        Ok(Some(j)) if failed == 0 && j.sweep_at_ms.is_none() => "done",
                        Ok(_) => "running",
                        Err(e) => return fail(e).await,
                    };
                    let matched = progress.iter().map(DestinationProgress::total).sum::<u64>();
                    let c = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
                    let _ = send(Event::Summary(pb::RevokeSummary {
                        job_id: id.clone(),
                        matched: c(matched),
                        revoked: c(revoked),
                        expires_at: c(expires_at),
                        failed: c(failed),
                        destinations: progress
                            .iter()
                            .map(crate::convert::progress_to_pb)
                            .collect(),
                        state: state.into(),
                        blocked: c(blocked),
                    }))
                    .await;
                    return;
                }
            }
            rt.revocation_changed(&mut watch, Duration::from_millis(500))
                .await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
