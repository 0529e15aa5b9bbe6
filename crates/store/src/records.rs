//! The records the [`crate::Store`] reads and writes.

use lanyard_core::{GrantId, UnixTime};
use serde::{Deserialize, Serialize};

/// The kinds of configuration object lanyard keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigKind {
    /// A trusted upstream issuer.
    Issuer,
    /// A rule mapping verified tokens to workloads.
    TrustRule,
    /// A destination (adapter kind + settings).
    Destination,
    /// A policy set version (immutable once stored; named `v1`, `v2`...).
    Policy,
    /// Which policy version is active (one object, named `active`).
    PolicyActivation,
    /// A deny entry: new exchanges of a workload, a workload prefix or an issuer are
    /// refused until it expires (named `<kind>:<value>`).
    DenyEntry,
    /// A destination's static key, sealed (AES-256-GCM, bound to the destination name),
    /// with its fingerprint; named after the destination. Never returned by any API.
    DestinationSecret,
}

impl ConfigKind {
    /// Every kind.
    pub const ALL: [ConfigKind; 7] = [
        ConfigKind::Issuer,
        ConfigKind::TrustRule,
        ConfigKind::Destination,
        ConfigKind::Policy,
        ConfigKind::PolicyActivation,
        ConfigKind::DenyEntry,
        ConfigKind::DestinationSecret,
    ];
    /// Stable spelling used in the database and in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigKind::Issuer => "issuer",
            ConfigKind::TrustRule => "trust_rule",
            ConfigKind::Destination => "destination",
            ConfigKind::Policy => "policy",
            ConfigKind::PolicyActivation => "policy_activation",
            ConfigKind::DenyEntry => "deny_entry",
            ConfigKind::DestinationSecret => "destination_secret",
        }
    }
    /// Parse the stable spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A configuration object to write.
#[derive(Debug, Clone, PartialEq)]
pub struct NewConfigObject {
    /// Its kind.
    pub kind: ConfigKind,
    /// Its name, unique within the kind.
    pub name: String,
    /// The validated settings, as JSON.
    pub spec: serde_json::Value,
    /// Who made the change (operator identity, `cli:uid=0`, `dev-bootstrap`...).
    pub updated_by: String,
    /// When, in seconds.
    pub now: UnixTime,
}

/// A stored configuration object.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigObject {
    /// Its kind.
    pub kind: ConfigKind,
    /// Its name.
    pub name: String,
    /// The settings, as JSON.
    pub spec: serde_json::Value,
    /// Monotonic revision, from the store-wide generation counter.
    pub revision: i64,
    /// First written.
    pub created_at: UnixTime,
    /// Last written.
    pub updated_at: UnixTime,
    /// Who wrote it last.
    pub updated_by: String,
}

/// Where a grant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    /// Issued and not yet expired, released or revoked.
    Active,
    /// The workload said its task is done.
    Released,
    /// An operator (or a kill switch) revoked it.
    Revoked,
    /// Its TTL ran out.
    Expired,
}

impl GrantStatus {
    /// Stable spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Active => "active",
            GrantStatus::Released => "released",
            GrantStatus::Revoked => "revoked",
            GrantStatus::Expired => "expired",
        }
    }
    /// Parse the stable spelling.
    pub fn parse(s: &str) -> Option<Self> {
        [
            GrantStatus::Active,
            GrantStatus::Released,
            GrantStatus::Revoked,
            GrantStatus::Expired,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One issued credential. Never holds the credential itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// The grant ID.
    pub id: GrantId,
    /// Canonical workload ID (SPIFFE ID).
    pub workload_id: String,
    /// Name of the issuer whose token proved the workload.
    pub issuer: String,
    /// Name of the trust rule that mapped the token.
    pub trust_rule: String,
    /// The task the grant is bound to, if the trust rule names one.
    pub task_id: Option<String>,
    /// Destination name.
    pub destination: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Delegation chain, outermost actor first (workload IDs).
    pub actor_chain: Vec<String>,
    /// Issued, seconds.
    pub issued_at: UnixTime,
    /// Expires, seconds.
    pub expires_at: UnixTime,
    /// Status.
    pub status: GrantStatus,
    /// When it left `active`, if it did.
    pub finished_at: Option<UnixTime>,
    /// What the destination needs to revoke it (a token `jti`, a role name...). Never a secret.
    pub revocation_handle: String,
    /// How many times it was renewed.
    pub renew_count: i64,
}

/// Which grants to list. Every set field must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GrantFilter {
    /// Exact workload ID.
    pub workload_id: Option<String>,
    /// Workload ID prefix.
    pub workload_prefix: Option<String>,
    /// Issuer name.
    pub issuer: Option<String>,
    /// Destination name.
    pub destination: Option<String>,
    /// Task ID.
    pub task_id: Option<String>,
    /// Status.
    pub status: Option<GrantStatus>,
}

/// A page request: at most `limit` items after `cursor`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PageRequest {
    /// Page size; implementations clamp it to 1..=1000 (0 means 100).
    pub limit: u32,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
}

impl PageRequest {
    /// The clamped page size.
    pub fn effective_limit(&self) -> u32 {
        match self.limit {
            0 => 100,
            n => n.min(1000),
        }
    }
}

/// One page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Cursor for the next page, `None` at the end.
    pub next_cursor: Option<String>,
}

/// Which grants a revocation covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum RevokeSelector {
    /// One grant, by ID.
    Grant(String),
    /// Every grant bound to this task.
    Task(String),
    /// Every grant of this workload (exact ID).
    Workload(String),
    /// Every grant of workloads whose ID starts with this prefix.
    WorkloadPrefix(String),
    /// Every grant proved by tokens of this issuer (its name).
    Issuer(String),
    /// Every grant for this destination.
    Destination(String),
}

impl RevokeSelector {
    /// Every selector kind, in its stable spelling.
    pub const KINDS: [&'static str; 6] = [
        "grant",
        "task",
        "workload",
        "workload_prefix",
        "issuer",
        "destination",
    ];

    /// Stable spelling of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            RevokeSelector::Grant(_) => "grant",
            RevokeSelector::Task(_) => "task",
            RevokeSelector::Workload(_) => "workload",
            RevokeSelector::WorkloadPrefix(_) => "workload_prefix",
            RevokeSelector::Issuer(_) => "issuer",
            RevokeSelector::Destination(_) => "destination",
        }
    }

    /// The value selected on.
    pub fn value(&self) -> &str {
        match self {
            RevokeSelector::Grant(v)
            | RevokeSelector::Task(v)
            | RevokeSelector::Workload(v)
            | RevokeSelector::WorkloadPrefix(v)
            | RevokeSelector::Issuer(v)
            | RevokeSelector::Destination(v) => v,
        }
    }

    /// Build from the stable spelling of a kind and a value.
    pub fn from_parts(kind: &str, value: String) -> Option<Self> {
        Some(match kind {
            "grant" => RevokeSelector::Grant(value),
            "task" => RevokeSelector::Task(value),
            "workload" => RevokeSelector::Workload(value),
            "workload_prefix" => RevokeSelector::WorkloadPrefix(value),
            "issuer" => RevokeSelector::Issuer(value),
            "destination" => RevokeSelector::Destination(value),
            _ => return None,
        })
    }

    /// The grant column the selector compares, and whether it is a prefix match.
    pub fn column(&self) -> (&'static str, bool) {
        match self {
            RevokeSelector::Grant(_) => ("id", false),
            RevokeSelector::Task(_) => ("task_id", false),
            RevokeSelector::Workload(_) => ("workload_id", false),
            RevokeSelector::WorkloadPrefix(_) => ("workload_id", true),
            RevokeSelector::Issuer(_) => ("issuer", false),
            RevokeSelector::Destination(_) => ("destination", false),
        }
    }
}

impl std::fmt::Display for RevokeSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.value())
    }
}

/// A revocation job to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRevocationJob {
    /// Job ID (`rvk_<uuidv7>`).
    pub id: String,
    /// Which grants.
    pub selector: RevokeSelector,
    /// Why (free text from the operator).
    pub reason: String,
    /// Who asked (`uid:0`, `issuer-distrust`...).
    pub requested_by: String,
    /// Now, seconds: grants expired at this time are not matched.
    pub now: UnixTime,
    /// Now, milliseconds.
    pub now_ms: i64,
    /// Match the active grants that have already expired (`expires_at <= now`) instead
    /// of the unexpired ones, and mark them `expired` rather than `revoked`: the
    /// clean-up of credentials that leave state at their destination (database roles).
    pub expired_only: bool,
    /// Match the selector once more at this time, milliseconds (see
    /// [`crate::Store::revocation_sweep`]); the job is not done before.
    pub sweep_at_ms: Option<i64>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Steps remain to be done (pending, or failed and waiting for a retry).
    Running,
    /// Every step reached a final outcome (revoked or expires_at).
    Done,
}

impl JobState {
    /// Stable spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
        }
    }
    /// Parse the stable spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(JobState::Running),
            "done" => Some(JobState::Done),
            _ => None,
        }
    }
}

/// A stored revocation job.
#[derive(Debug, Clone, PartialEq)]
pub struct RevocationJob {
    /// Job ID.
    pub id: String,
    /// Which grants.
    pub selector: RevokeSelector,
    /// Why.
    pub reason: String,
    /// Who asked.
    pub requested_by: String,
    /// Created, milliseconds.
    pub created_at_ms: i64,
    /// Grants matched (one step each).
    pub matched: u64,
    /// State.
    pub state: JobState,
    /// When it reached `done`, milliseconds.
    pub finished_at_ms: Option<i64>,
    /// When a worker should next look at it, milliseconds.
    pub next_run_at_ms: i64,
    /// Receipts written so far (their `seq` run 1..=receipts).
    pub receipts: i64,
    /// A sweep still to run at this time, milliseconds.
    pub sweep_at_ms: Option<i64>,
}

/// Where one grant's revocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not yet attempted.
    Pending,
    /// The destination confirmed.
    Revoked,
    /// A deny rule was written at the destination (an AWS role's deny policy); the
    /// credential exists until its expiry and the block takes time to propagate.
    Blocked,
    /// The destination cannot revoke early; the credential lapses at its expiry.
    ExpiresAt,
    /// The last attempt failed; it is retried at `next_attempt_at_ms`.
    Failed,
    /// An operator gave up on it after failures: no more attempts.
    Abandoned,
}

impl StepState {
    /// Stable spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Revoked => "revoked",
            StepState::Blocked => "blocked",
            StepState::ExpiresAt => "expires_at",
            StepState::Failed => "failed",
            StepState::Abandoned => "abandoned",
        }
    }
    /// Parse the stable spelling.
    pub fn parse(s: &str) -> Option<Self> {
        [
            StepState::Pending,
            StepState::Revoked,
            StepState::Blocked,
            StepState::ExpiresAt,
            StepState::Failed,
            StepState::Abandoned,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
    /// Whether no more work is due for a step in this state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StepState::Revoked | StepState::Blocked | StepState::ExpiresAt | StepState::Abandoned
        )
    }
}

/// One grant of a job, as the outbox holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RevocationStep {
    /// The job.
    pub job_id: String,
    /// The grant.
    pub grant_id: String,
    /// Its destination.
    pub destination: String,
    /// Its workload.
    pub workload_id: String,
    /// What the destination needs to revoke it.
    pub revocation_handle: String,
    /// When the credential expires, seconds.
    pub expires_at: UnixTime,
    /// State.
    pub state: StepState,
    /// Attempts made.
    pub attempts: i64,
    /// When it is due (again), milliseconds.
    pub next_attempt_at_ms: i64,
    /// The last outcome's detail or error.
    pub detail: String,
}

/// A signed statement of what one destination did for some grants of a job. Writing it
/// moves those grants' steps to its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct RevocationReceiptRecord {
    /// The job.
    pub job_id: String,
    /// 1, 2, ... within the job.
    pub seq: i64,
    /// The destination.
    pub destination: String,
    /// `revoked`, `blocked`, `expires_at` or `failed`.
    pub outcome: StepState,
    /// The grants it covers.
    pub grant_ids: Vec<String>,
    /// For `expires_at`: the latest expiry among the grants, seconds.
    pub expires_at: Option<UnixTime>,
    /// How it was revoked, or the error.
    pub detail: String,
    /// When, milliseconds.
    pub created_at_ms: i64,
    /// lanyard's compact JWS over the receipt.
    pub signature: String,
    /// For `failed`: when the grants are tried again, milliseconds.
    pub retry_at_ms: Option<i64>,
}

/// Step counts of one destination in a job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationProgress {
    /// The destination.
    pub destination: String,
    /// Not yet attempted.
    pub pending: u64,
    /// Confirmed revoked.
    pub revoked: u64,
    /// Blocked by a deny rule at the destination (propagating).
    pub blocked: u64,
    /// Lapse at expiry.
    pub expires_at: u64,
    /// Failed, being retried.
    pub failed: u64,
    /// Given up by an operator.
    pub abandoned: u64,
    /// Latest expiry among the `expires_at` steps, seconds.
    pub latest_expiry: Option<UnixTime>,
}

impl DestinationProgress {
    /// All steps.
    pub fn total(&self) -> u64 {
        self.pending + self.revoked + self.blocked + self.expires_at + self.failed + self.abandoned
    }
}

/// The claims a workload presented, as last seen (without per-token claims such as
/// `exp`, `iat` or `jti`).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSeen {
    /// Canonical workload ID.
    pub workload_id: String,
    /// Name of the issuer that proved it.
    pub issuer: String,
    /// Name of the trust rule that mapped it.
    pub trust_rule: String,
    /// The verified claims (a JSON object).
    pub claims: serde_json::Value,
    /// First seen, seconds (ignored on update).
    pub first_seen: UnixTime,
    /// Last seen, seconds.
    pub last_seen: UnixTime,
}
