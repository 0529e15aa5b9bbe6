//! The `jti` replay check: a small trait the server wires to shared storage, and an
//! in-memory implementation for tests and single-node deployments.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use lanyard_core::{SharedClock, UnixTime};

/// The replay guard could not answer. Verification fails closed on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The guard is at capacity with unexpired entries.
    #[error("replay guard is full ({0} unexpired entries)")]
    Full(usize),
    /// The backing store failed.
    #[error("replay guard backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Records each `(issuer, jti)` pair once.
#[async_trait]
pub trait ReplayGuard: Send + Sync {
    /// Returns `true` if this is the first use of `jti` at `issuer` (and records it until
    /// `expires_at`), `false` if it was seen before. The verifier passes the token's
    /// `iss` (the issuer's `issuer_url`) as `issuer`: the namespace in which the issuer
    /// keeps `jti`s unique, unaffected by renaming the issuer configuration.
    ///
    /// # Errors
    /// [`ReplayError`] when the guard cannot tell; the caller refuses the token.
    async fn check_and_record(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: UnixTime,
    ) -> Result<bool, ReplayError>;
}

/// A bounded in-memory replay guard. Expired entries are evicted when the guard fills up;
/// if it is still full, new tokens are refused rather than let through.
#[derive(Debug)]
pub struct InMemoryReplayGuard {
    clock: SharedClock,
    max_entries: usize,
    seen: Mutex<HashMap<(String, String), UnixTime>>,
}

impl InMemoryReplayGuard {
    /// Default capacity.
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

    /// A guard holding at most `max_entries` unexpired `jti`s.
    pub fn new(clock: SharedClock, max_entries: usize) -> Self {
        Self {
            clock,
            max_entries: max_entries.max(1),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Number of entries held (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the guard holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl ReplayGuard for InMemoryReplayGuard {
    async fn check_and_record(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: UnixTime,
    ) -> Result<bool, ReplayError> {
        let now = self.clock.now_unix();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (issuer.to_owned(), jti.to_owned());
        if let Some(&until) = seen.get(&key)
            && until >= now
        {
            return Ok(false);
        }
        if seen.len() >= self.max_entries {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= self.max_entries {
                return Err(ReplayError::Full(seen.len()));
            }
        }
        seen.insert(key, expires_at);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lanyard_core::FakeClock;

    use super::*;

    #[tokio::test]
    async fn first_use_only_per_issuer() {
        let clock = FakeClock::at(1_000);
        let g = InMemoryReplayGuard::new(Arc::new(clock.clone()), 10);
        assert!(g.check_and_record("a", "j1", 1_100).await.unwrap());
        assert!(!g.check_and_record("a", "j1", 1_100).await.unwrap());
        assert!(g.check_and_record("b", "j1", 1_100).await.unwrap());
        clock.advance(200);
        // Expired entries no longer block (the token itself is expired by then).
        assert!(g.check_and_record("a", "j1", 1_400).await.unwrap());
    }

    #[tokio::test]
    async fn bounded_and_evicts_expired() {
        let clock = FakeClock::at(1_000);
        let g = InMemoryReplayGuard::new(Arc::new(clock.clone()), 2);
        assert!(g.check_and_record("a", "1", 1_010).await.unwrap());
        assert!(g.check_and_record("a", "2", 1_500).await.unwrap());
        assert!(matches!(
            g.check_and_record("a", "3", 1_500).await,
            Err(ReplayError::Full(2))
        ));
        clock.advance(20);
        assert!(g.check_and_record("a", "3", 1_500).await.unwrap());
        assert_eq!(g.len(), 2);
    }
}
