//! Audit events as the store keeps them, and the hash-chain rule.
//!
//! ## Why a text payload
//! The event is serialized once, stored as text, and the hash covers exactly those
//! bytes. Verification recomputes the hash from the stored text, so no JSON
//! canonicalization question can make an intact chain look broken.

use lanyard_core::UnixTime;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An audit event to append. Holds no secrets: tokens appear only as HMAC fingerprints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEvent {
    /// When, in milliseconds since the epoch.
    pub time_ms: i64,
    /// Event kind, e.g. `exchange.granted`, `exchange.denied`, `issuer.put`.
    pub kind: String,
    /// Request ID of the RPC that caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Who: the workload ID or the operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Workload ID, when one is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_id: Option<String>,
    /// Issuer name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Destination name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Task ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Grant ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// `allow` or `deny` for decisions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Stable reason code for denials and failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Anything else (scopes, TTL, policy IDs, before/after of a change...).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl NewAuditEvent {
    /// The payload text that is stored and hashed.
    pub fn payload(&self) -> String {
        // Serializing a struct of strings and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
    /// Seconds part of the time.
    pub fn time_unix(&self) -> UnixTime {
        self.time_ms.div_euclid(1000)
    }
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1, without gaps.
    pub seq: i64,
    /// Milliseconds since the epoch.
    pub time_ms: i64,
    /// Event kind.
    pub kind: String,
    /// The event as stored JSON text (a serialized [`NewAuditEvent`]).
    pub payload: String,
    /// Hash of the previous event (hex), [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// This event's hash (hex), [`chain_hash`] of the fields above.
    pub hash: String,
}

impl AuditRecord {
    /// Whether `hash` matches the record's own fields.
    pub fn hash_is_valid(&self) -> bool {
        chain_hash(self.seq, &self.prev_hash, &self.payload) == self.hash
    }
}

/// `sha256("lanyard-audit-v1\n" || seq || "\n" || prev_hash || "\n" || payload)` in hex.
pub fn chain_hash(seq: i64, prev_hash: &str, payload: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"lanyard-audit-v1\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(payload.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_covers_every_field() {
        let base = chain_hash(1, GENESIS_HASH, "{}");
        assert_ne!(base, chain_hash(2, GENESIS_HASH, "{}"));
        assert_ne!(base, chain_hash(1, &base, "{}"));
        assert_ne!(base, chain_hash(1, GENESIS_HASH, "{ }"));
        assert_eq!(base.len(), 64);
    }
}
