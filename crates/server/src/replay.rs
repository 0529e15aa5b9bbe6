//! The `jti` replay check of `lanyard-trust`, backed by the store so it holds across
//! restarts and across replicas sharing one database.

use std::sync::Arc;

use async_trait::async_trait;
use lanyard_core::{SharedClock, UnixTime};
use lanyard_store::Store;
use lanyard_trust::{ReplayError, ReplayGuard};

/// Replay guard over [`Store::jti_record`].
pub struct StoreReplayGuard {
    store: Arc<dyn Store>,
    clock: SharedClock,
}

impl StoreReplayGuard {
    /// A guard over `store`.
    pub fn new(store: Arc<dyn Store>, clock: SharedClock) -> Self {
        Self { store, clock }
    }
}

#[async_trait]
impl ReplayGuard for StoreReplayGuard {
    async fn check_and_record(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: UnixTime,
    ) -> Result<bool, ReplayError> {
        self.store
            .jti_record(issuer, jti, expires_at, self.clock.now_unix())
            .await
            .map_err(|e| ReplayError::Backend(Box::new(e)))
    }
}
