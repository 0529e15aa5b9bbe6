//! Newtypes for the identifiers lanyard passes around. Each validates on construction,
//! so a value of the type is always well formed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A value that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The workload ID is not a `spiffe://` URI with a trust domain and a path.
    #[error("workload id must be spiffe://<trust-domain>/<path>: {0}")]
    WorkloadId(String),
    /// The scope has characters outside the allowed set or is too long.
    #[error("scope must be 1-128 characters of [A-Za-z0-9:._/*-]: {0:?}")]
    Scope(String),
    /// The task ID is empty, too long or has control characters.
    #[error("task id must be 1-256 printable characters")]
    TaskId,
    /// The grant ID is not one lanyard issued.
    #[error("grant id is malformed")]
    GrantId,
    /// The TTL is zero or out of range.
    #[error("ttl must be between 1 second and 7 days")]
    Ttl,
}

/// The canonical ID of a workload: a SPIFFE ID in lanyard's trust domain,
/// e.g. `spiffe://lanyard.local/k8s/prod/ns/payments/sa/api`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkloadId(String);

impl WorkloadId {
    /// Parse and validate a SPIFFE ID (SPIFFE-ID spec: lowercase trust domain of
    /// `[a-z0-9.-_]`, path segments of `[A-Za-z0-9.-_]`, no empty, `.` or `..` segment).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let err = || IdError::WorkloadId(s.chars().take(300).collect());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        if s.len() > 2048 {
            return Err(err());
        }
        let (td, path) = rest.split_once('/').ok_or_else(err)?;
        if td.is_empty()
            || !td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(err());
        }
        for seg in path.split('/') {
            if seg.is_empty()
                || seg == "."
                || seg == ".."
                || !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(err());
            }
        }
        Ok(Self(s.to_owned()))
    }
    /// The trust domain part.
    pub fn trust_domain(&self) -> &str {
        self.0["spiffe://".len()..]
            .split('/')
            .next()
            .unwrap_or_default()
    }
    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WorkloadId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}
impl From<WorkloadId> for String {
    fn from(w: WorkloadId) -> String {
        w.0
    }
}
impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The ID of one grant: `grt_` followed by a UUIDv7 in simple form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GrantId(String);

impl GrantId {
    const PREFIX: &'static str = "grt_";
    /// A fresh, time-ordered grant ID.
    pub fn generate() -> Self {
        Self(format!("{}{}", Self::PREFIX, uuid::Uuid::now_v7().simple()))
    }
    /// Parse a grant ID.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let hex = s.strip_prefix(Self::PREFIX).ok_or(IdError::GrantId)?;
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdError::GrantId);
        }
        Ok(Self(s.to_owned()))
    }
    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for GrantId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}
impl From<GrantId> for String {
    fn from(g: GrantId) -> String {
        g.0
    }
}
impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The task a grant is bound to (a CI run, a pod UID, an agent session).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    /// Parse a task ID.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
            return Err(IdError::TaskId);
        }
        Ok(Self(s.to_owned()))
    }
    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for TaskId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}
impl From<TaskId> for String {
    fn from(t: TaskId) -> String {
        t.0
    }
}
impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One permission at a destination, e.g. `read`, `orders:write`, `repo/*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(String);

impl Scope {
    /// Parse a scope.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty()
            || s.len() > 128
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":._/*-".contains(&b))
        {
            return Err(IdError::Scope(s.chars().take(140).collect()));
        }
        Ok(Self(s.to_owned()))
    }
    /// The scope as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for Scope {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}
impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.0
    }
}
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A credential lifetime in whole seconds, 1 s to 7 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Ttl(u32);

impl Ttl {
    /// The longest TTL lanyard issues.
    pub const MAX: Ttl = Ttl(7 * 24 * 3600);
    /// A TTL of `secs` seconds.
    pub fn from_secs(secs: u64) -> Result<Self, IdError> {
        if secs == 0 || secs > u64::from(Self::MAX.0) {
            return Err(IdError::Ttl);
        }
        u32::try_from(secs).map(Self).map_err(|_| IdError::Ttl)
    }
    /// The TTL in seconds.
    pub fn as_secs(self) -> u64 {
        u64::from(self.0)
    }
    /// The TTL in seconds, signed, for time arithmetic.
    pub fn as_secs_i64(self) -> i64 {
        i64::from(self.0)
    }
}
impl TryFrom<u64> for Ttl {
    type Error = IdError;
    fn try_from(s: u64) -> Result<Self, IdError> {
        Self::from_secs(s)
    }
}
impl From<Ttl> for u64 {
    fn from(t: Ttl) -> u64 {
        t.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids() {
        let w = WorkloadId::parse("spiffe://lanyard.local/k8s/prod/ns/payments/sa/api").unwrap();
        assert_eq!(w.trust_domain(), "lanyard.local");
        for bad in [
            "",
            "http://x/y",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/x",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a b",
            "spiffe://td/a?x",
        ] {
            assert!(WorkloadId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grant_ids_round_trip() {
        let g = GrantId::generate();
        assert_eq!(GrantId::parse(g.as_str()).unwrap(), g);
        assert!(GrantId::parse("grt_zz").is_err());
        assert!(GrantId::parse("' OR 1=1 --").is_err());
    }

    #[test]
    fn scopes_and_ttls() {
        assert!(Scope::parse("orders:read").is_ok());
        assert!(Scope::parse("repo/*").is_ok());
        assert!(Scope::parse("").is_err());
        assert!(Scope::parse("a b").is_err());
        assert!(Ttl::from_secs(0).is_err());
        assert!(Ttl::from_secs(8 * 24 * 3600).is_err());
        assert_eq!(Ttl::from_secs(60).unwrap().as_secs(), 60);
        assert!(TaskId::parse("run-1").is_ok());
        assert!(TaskId::parse("a\nb").is_err());
    }
}
