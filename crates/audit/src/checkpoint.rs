//! Signed checkpoints: lanyard's signature over the chain head at a moment.
//!
//! A checkpoint says "event `seq` has hash `head_hash`, as of `time_ms`", signed with
//! lanyard's signing key as a compact JWS (`typ` [`CHECKPOINT_TYP`]). lanyard writes one
//! into the chain itself every so often (kind `audit.checkpoint`), and an auditor may keep
//! any of them outside lanyard. Someone with write access to the database can recompute
//! every hash after an edit, but cannot sign: the first checkpoint after the edit no
//! longer matches, and a checkpoint kept outside proves how long the chain was.

use jsonwebtoken::{DecodingKey, Validation, jwk::Jwk};
use lanyard_store::NewAuditEvent;
use serde::{Deserialize, Serialize};

use crate::kinds::AUDIT_CHECKPOINT;

/// The JWS `typ` of a checkpoint. lanyard never accepts it as a subject token (its own
/// issuer is refused), and a credential verifier expecting `at+jwt` refuses it too.
pub const CHECKPOINT_TYP: &str = "lanyard-audit-checkpoint+jwt";

/// What a checkpoint asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// lanyard's issuer URL (who signed).
    pub iss: String,
    /// The sequence number of the event covered.
    pub seq: i64,
    /// That event's hash.
    pub head_hash: String,
    /// When the checkpoint was made, milliseconds since the epoch.
    pub time_ms: i64,
}

impl Checkpoint {
    /// The claims to sign.
    pub fn claims(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The `audit.checkpoint` event that carries this checkpoint, signed as `jws`.
    pub fn event(&self, jws: &str) -> NewAuditEvent {
        NewAuditEvent {
            time_ms: self.time_ms,
            kind: AUDIT_CHECKPOINT.into(),
            detail: serde_json::json!({
                "seq": self.seq,
                "head_hash": self.head_hash,
                "jws": jws,
            }),
            ..NewAuditEvent::default()
        }
    }
}

/// Why a checkpoint was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Not a JWS, or its header or claims do not parse.
    #[error("the checkpoint is malformed: {0}")]
    Malformed(String),
    /// Signed with a key lanyard does not have.
    #[error("the checkpoint is signed with an unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the checkpoint's signature does not verify")]
    BadSignature,
}

/// Verifies checkpoints with lanyard's public keys, retired ones included.
pub struct CheckpointVerifier {
    keys: Vec<Jwk>,
}

impl CheckpointVerifier {
    /// From a JWKS document (`{"keys": [...]}`); keys that do not parse are skipped.
    pub fn from_jwks(jwks: &serde_json::Value) -> Self {
        let keys = jwks["keys"]
            .as_array()
            .map(|ks| {
                ks.iter()
                    .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        Self { keys }
    }

    /// Verify `jws` and return what it asserts.
    ///
    /// # Errors
    /// [`CheckpointError`].
    pub fn verify(&self, jws: &str) -> Result<Checkpoint, CheckpointError> {
        let header = jsonwebtoken::decode_header(jws.trim())
            .map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        if header.typ.as_deref() != Some(CHECKPOINT_TYP) {
            return Err(CheckpointError::Malformed(format!(
                "typ is {:?}, expected {CHECKPOINT_TYP:?}",
                header.typ
            )));
        }
        let kid = header.kid.unwrap_or_default();
        let jwk = self
            .keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
            .ok_or_else(|| CheckpointError::UnknownKey(kid.clone()))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| CheckpointError::UnknownKey(kid))?;
        // The algorithm is the key's, never the header's choice.
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse().ok())
            .ok_or_else(|| CheckpointError::Malformed("the key has no algorithm".into()))?;
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Checkpoint>(jws.trim(), &key, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => CheckpointError::BadSignature,
                _ => CheckpointError::Malformed(e.to_string()),
            },
        )?;
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lanyard_core::SystemClock;
    use lanyard_keys::{KeyRing, SigningAlgorithm};

    use super::*;

    fn ring(alg: SigningAlgorithm) -> (tempfile::TempDir, KeyRing) {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let ring = KeyRing::open(&keys, alg, Arc::new(SystemClock)).unwrap();
        (dir, ring)
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            iss: "http://127.0.0.1:8081".into(),
            seq: 42,
            head_hash: "ab".repeat(32),
            time_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trip_both_algorithms_and_after_rotation() {
        for alg in [SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
            let (_d, ring) = ring(alg);
            let jws = ring.sign(CHECKPOINT_TYP, &checkpoint().claims()).unwrap();
            let v = CheckpointVerifier::from_jwks(&ring.all_public_jwks());
            assert_eq!(v.verify(jws.expose()).unwrap(), checkpoint());
            ring.rotate(std::time::Duration::ZERO).unwrap();
            let v = CheckpointVerifier::from_jwks(&ring.all_public_jwks());
            assert_eq!(
                v.verify(jws.expose()).unwrap(),
                checkpoint(),
                "old key still verifies"
            );
        }
    }

    #[test]
    fn tampered_foreign_and_wrong_typ_are_refused() {
        let (_d, ring) = ring(SigningAlgorithm::ES256);
        let (_d2, other) = ring_other();
        let v = CheckpointVerifier::from_jwks(&ring.all_public_jwks());
        let jws = ring.sign(CHECKPOINT_TYP, &checkpoint().claims()).unwrap();
        let jws = jws.expose();

        // Claims swapped for others with a higher seq, signature kept.
        let mut parts: Vec<String> = jws.split('.').map(str::to_owned).collect();
        let mut forged = checkpoint();
        forged.seq = 4242;
        use base64::Engine as _;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&forged.claims()).unwrap());
        assert_eq!(
            v.verify(&parts.join(".")),
            Err(CheckpointError::BadSignature)
        );

        let foreign = other.sign(CHECKPOINT_TYP, &checkpoint().claims()).unwrap();
        assert!(matches!(
            v.verify(foreign.expose()),
            Err(CheckpointError::UnknownKey(_))
        ));
        let wrong_typ = ring.sign("at+jwt", &checkpoint().claims()).unwrap();
        assert!(matches!(
            v.verify(wrong_typ.expose()),
            Err(CheckpointError::Malformed(_))
        ));
        assert!(matches!(
            v.verify("not a jws"),
            Err(CheckpointError::Malformed(_))
        ));
    }

    fn ring_other() -> (tempfile::TempDir, KeyRing) {
        ring(SigningAlgorithm::ES256)
    }
}
