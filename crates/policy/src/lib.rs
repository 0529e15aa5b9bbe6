//! The authorization decision: may this workload have this destination, with these
//! scopes and this TTL, right now? Default deny, policy-as-code in Cedar, and every
//! [`Decision`] names the policy version and the policies that decided it.
//!
//! Callers see only the small [`Authorizer`] trait; [`CedarAuthorizer`] is the one
//! implementation. Policies are validated against lanyard's Cedar schema ([`SCHEMA`]) when
//! loaded; see [`cedar`] for the entity model they are written against and docs/policy.md
//! for examples.

pub mod cedar;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use lanyard_core::UnixTime;

pub use cedar::{CedarAuthorizer, MAX_TTL_ANNOTATION, SCHEMA, schema, validate};

/// What the workload asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// First exchange of a subject token for a credential
    /// (Cedar: `Lanyard::Action::"exchange"`).
    Exchange,
    /// Renewal with fresh proof (Cedar: `Lanyard::Action::"renew"`).
    Renew,
    /// Acting for another party in a delegation chain (Cedar:
    /// `Lanyard::Action::"act_for"`). Declared in the schema so policies can name it;
    /// lanyard does not ask it yet.
    ActFor,
}

impl Action {
    /// The Cedar action ID.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Exchange => "exchange",
            Action::Renew => "renew",
            Action::ActFor => "act_for",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a decision may look at. Borrowed so the hot path copies nothing it does
/// not have to.
#[derive(Debug, Clone, Copy)]
pub struct DecisionRequest<'a> {
    /// Canonical workload ID (a SPIFFE ID).
    pub workload_id: &'a str,
    /// Name of the issuer that proved the workload.
    pub issuer: &'a str,
    /// The subject token's verified claims.
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
    /// Destination name.
    pub destination: &'a str,
    /// Destination adapter kind, e.g. `jwt`.
    pub destination_kind: &'a str,
    /// Destination labels.
    pub destination_labels: &'a BTreeMap<String, String>,
    /// Exchange or renew.
    pub action: Action,
    /// Requested scopes.
    pub scopes: &'a [String],
    /// Requested TTL, seconds (after the destination's clamp).
    pub ttl_secs: u64,
    /// The task the grant is bound to, if any.
    pub task_id: Option<&'a str>,
    /// Now, Unix seconds, from lanyard's clock.
    pub now: UnixTime,
    /// The delegation chain, nearest actor first (empty when not delegated).
    pub delegation: &'a [String],
    /// The workload the credential is for; for `act_for` this differs from
    /// `workload_id` (the actor).
    pub subject: &'a str,
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed. `false` unless a policy permits it and none
    /// forbids it.
    pub allowed: bool,
    /// Version of the policy set that decided.
    pub policy_version: String,
    /// The policies that decided: the satisfied permits when allowed; the satisfied (or
    /// failed) forbids when denied by one; empty for a default deny. Policy IDs are the
    /// `@id("...")` annotations where present, else Cedar's `policy0`, `policy1`...
    pub determining_policies: Vec<String>,
    /// Evaluation errors, one per failing policy, naming the policy. Never secret: they
    /// name attributes, not claim values.
    pub errors: Vec<String>,
    /// When allowed: the smallest `@max_ttl_secs("...")` among the determining permits,
    /// which the caller clamps the grant's TTL to; `None` if none carries one, and
    /// always `None` when denied.
    pub max_ttl_secs: Option<u64>,
    /// When allowed: the smallest `@max_active_grants("...")` among the determining
    /// permits: the workload may hold at most this many active grants (the server counts
    /// them and refuses beyond). `None` when no permit carries one, and when denied.
    pub max_active_grants: Option<u64>,
}

/// Makes decisions. Implementations are immutable snapshots of one policy version;
/// swapping versions is the caller's business (e.g. an `ArcSwap` in the server).
pub trait Authorizer: Send + Sync {
    /// Decide `req`. Never fails: anything that prevents a decision is a deny with the
    /// reason in [`Decision::errors`].
    fn decide(&self, req: &DecisionRequest<'_>) -> Decision;
    /// The version of the policy set in force.
    fn version(&self) -> String;
}

/// Errors loading a policy set.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy text does not parse, does not validate against the schema, or is not
    /// acceptable (templates, a malformed `@max_ttl_secs`); `message` has Cedar's
    /// diagnostics with line and column.
    #[error("invalid policy: {message}")]
    Parse {
        /// Rendered diagnostics, one per line.
        message: String,
    },
    /// Two policies carry the same ID.
    #[error("duplicate policy id {0:?}")]
    DuplicateId(String),
    /// Reading the policy file failed.
    #[error("reading policy file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`PolicyError`].
pub type Result<T, E = PolicyError> = std::result::Result<T, E>;

/// The development policy `lanyard serve --dev` loads: any workload under
/// `spiffe://lanyard.local/dev/` may exchange and renew for any destination.
pub const DEV_POLICY: &str = r#"// Development only: every workload under spiffe://lanyard.local/dev/ may get
// credentials for every destination. Never load this in production.
@id("dev-allow")
permit (
    principal is Lanyard::Workload,
    action in [Lanyard::Action::"exchange", Lanyard::Action::"renew"],
    resource is Lanyard::Destination
)
when { principal.id like "spiffe://lanyard.local/dev/*" };
"#;
