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
}

impl ConfigKind {
    /// Every kind.
    pub const ALL: [ConfigKind; 5] = [
        ConfigKind::Issuer,
        ConfigKind::TrustRule,
        ConfigKind::Destination,
        ConfigKind::Policy,
        ConfigKind::PolicyActivation,
    ];
    /// Stable spelling used in the database and in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigKind::Issuer => "issuer",
            ConfigKind::TrustRule => "trust_rule",
            ConfigKind::Destination => "destination",
            ConfigKind::Policy => "policy",
            ConfigKind::PolicyActivation => "policy_activation",
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
