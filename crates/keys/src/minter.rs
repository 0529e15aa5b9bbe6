//! [`KeyRingMinter`]: the [`TokenMinter`] destination adapters use, backed by a
//! [`KeyRing`].

use std::sync::Arc;

use lanyard_core::Secret;
use lanyard_destination::{MintError, TokenMinter};

use crate::KeyRing;

/// lanyard's issuer as adapters see it: an issuer URL and the key ring that signs.
#[derive(Debug, Clone)]
pub struct KeyRingMinter {
    ring: Arc<KeyRing>,
    issuer_url: String,
}

impl KeyRingMinter {
    /// A minter signing with `ring` and naming `issuer_url` as `iss`.
    pub fn new(ring: Arc<KeyRing>, issuer_url: impl Into<String>) -> Self {
        Self {
            ring,
            issuer_url: issuer_url.into(),
        }
    }

    /// The key ring.
    pub fn ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }
}

impl TokenMinter for KeyRingMinter {
    fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    fn mint(&self, claims: &serde_json::Value, typ: &str) -> Result<Secret, MintError> {
        self.ring
            .sign(typ, claims)
            .map_err(|e| MintError(e.to_string()))
    }
}
