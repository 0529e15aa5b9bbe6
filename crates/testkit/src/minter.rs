//! lanyard's side of a destination adapter test: its key ring (ES256, in a temporary
//! directory) and the minter adapters sign with, a [`DestinationSpec`] from JSON with
//! per-test settings, and one issue request for a workload.

use std::sync::Arc;

use lanyard_core::{Clock as _, GrantId, Scope, SystemClock, Ttl, WorkloadId};
use lanyard_destination::{Destination, DestinationError, DestinationSpec, IssueRequest, Issued};
use lanyard_keys::{KeyRing, KeyRingMinter, SigningAlgorithm};
use serde_json::Value;

/// A key ring in a temporary directory and a minter for `issuer` over it.
pub struct TestMinter {
    /// The key ring (its JWKS is what a destination verifies against).
    pub ring: Arc<KeyRing>,
    /// What adapters sign with.
    pub minter: Arc<KeyRingMinter>,
    _dir: tempfile::TempDir,
}

impl TestMinter {
    /// A fresh ES256 key ring, and a minter naming `issuer` as `iss`.
    pub fn new(issuer: &str) -> TestMinter {
        let dir = tempfile::tempdir().unwrap();
        let ring = Arc::new(
            KeyRing::open(
                &dir.path().join("keys"),
                SigningAlgorithm::ES256,
                SystemClock::shared(),
            )
            .unwrap(),
        );
        let minter = Arc::new(KeyRingMinter::new(ring.clone(), issuer));
        TestMinter {
            ring,
            minter,
            _dir: dir,
        }
    }

    /// The key ring's public JWKS document.
    pub fn jwks(&self) -> Value {
        self.ring.jwks()
    }
}

/// `settings` with every key of `extra` (an object) set in it, replacing what was there.
pub fn merged(mut settings: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        settings[k] = v.clone();
    }
    settings
}

/// A spec: the common fields of `spec` (`name`, `kind`, `max_ttl_secs`, `scopes`...)
/// with `settings` as its `settings`.
pub fn spec(mut spec: Value, settings: Value) -> DestinationSpec {
    spec["settings"] = settings;
    serde_json::from_value(spec).unwrap()
}

/// Issue through `d` for `workload` (issuer `k8s`): a new grant of `ttl` seconds for
/// `scopes`, now from the system clock, no task, no delegation, no claims.
pub async fn issue(
    d: &dyn Destination,
    workload: &str,
    ttl: u64,
    scopes: &[&str],
) -> Result<Issued, DestinationError> {
    let grant = GrantId::generate();
    let workload = WorkloadId::parse(workload).unwrap();
    let claims = serde_json::Map::new();
    let scopes: Vec<Scope> = scopes.iter().map(|s| Scope::parse(s).unwrap()).collect();
    d.issue(IssueRequest {
        grant_id: &grant,
        workload: &workload,
        issuer: "k8s",
        task: None,
        scopes: &scopes,
        ttl: Ttl::from_secs(ttl).unwrap(),
        now: SystemClock.now_unix(),
        actor_chain: &[],
        claims: &claims,
    })
    .await
}
