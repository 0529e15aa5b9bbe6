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
    /// OpenTelemetry trace ID (32 hex digits) of the RPC, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
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
    /// HMAC fingerprint of the subject token (`hmac-sha256:...`); never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_fingerprint: Option<String>,
    /// Scopes asked for (denials) or granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// `allow` or `deny` for decisions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Stable reason code for denials and failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy version that decided, for decisions that reached policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
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
        hash_matches(self.seq, &self.prev_hash, &self.payload, &self.hash)
    }
}

/// An event linked into the chain, ready to insert: what every store writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// Its sequence number.
    pub seq: i64,
    /// [`NewAuditEvent::payload`].
    pub payload: String,
    /// The hash of the event before it.
    pub prev_hash: String,
    /// [`chain_hash`] of the three above.
    pub hash: String,
}

/// Link `events`, in order, after the chain head (`head_seq`, `head_hash`). The last
/// link is the new head.
///
/// # Errors
/// [`crate::StoreError::Corrupt`] if the sequence number would overflow.
pub fn link_after(
    head_seq: i64,
    head_hash: String,
    events: &[NewAuditEvent],
) -> Result<Vec<ChainLink>, crate::StoreError> {
    let mut seq = head_seq;
    let mut prev = head_hash;
    let mut links = Vec::with_capacity(events.len());
    for event in events {
        seq = seq
            .checked_add(1)
            .ok_or_else(|| crate::StoreError::Corrupt("audit sequence overflow".into()))?;
        let payload = event.payload();
        let hash = chain_hash(seq, &prev, &payload);
        links.push(ChainLink {
            seq,
            payload,
            prev_hash: std::mem::replace(&mut prev, hash.clone()),
            hash,
        });
    }
    Ok(links)
}

/// `sha256("lanyard-audit-v1\n" || seq || "\n" || prev_hash || "\n" || payload)` in hex.
pub fn chain_hash(seq: i64, prev_hash: &str, payload: &str) -> String {
    hex::encode(chain_digest(seq, prev_hash, payload))
}

/// Whether `expected_hex` is [`chain_hash`] of the other arguments, without allocating
/// (verification checks millions of these).
pub fn hash_matches(seq: i64, prev_hash: &str, payload: &str, expected_hex: &str) -> bool {
    let mut expected = [0u8; 32];
    // Lowercase only, as written: the next event names this hash as text.
    expected_hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && hex::decode_to_slice(expected_hex, &mut expected).is_ok()
        && chain_digest(seq, prev_hash, payload).as_slice() == expected
}

fn chain_digest(seq: i64, prev_hash: &str, payload: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"lanyard-audit-v1\n");
    h.update(itoa::Buffer::new().format(seq).as_bytes());
    h.update(b"\n");
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(payload.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_follow_the_head_in_order() {
        let events: Vec<NewAuditEvent> = ["a", "b"]
            .into_iter()
            .map(|k| NewAuditEvent {
                kind: k.into(),
                ..NewAuditEvent::default()
            })
            .collect();
        let links = link_after(7, GENESIS_HASH.into(), &events).unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!((links[0].seq, links[1].seq), (8, 9));
        assert_eq!(links[0].prev_hash, GENESIS_HASH);
        assert_eq!(links[1].prev_hash, links[0].hash);
        for (link, event) in links.iter().zip(&events) {
            assert_eq!(link.payload, event.payload());
            assert!(hash_matches(
                link.seq,
                &link.prev_hash,
                &link.payload,
                &link.hash
            ));
        }
        assert!(link_after(3, GENESIS_HASH.into(), &[]).unwrap().is_empty());
        assert!(matches!(
            link_after(i64::MAX, GENESIS_HASH.into(), &events),
            Err(crate::StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn hash_covers_every_field() {
        let base = chain_hash(1, GENESIS_HASH, "{}");
        assert_ne!(base, chain_hash(2, GENESIS_HASH, "{}"));
        assert_ne!(base, chain_hash(1, &base, "{}"));
        assert_ne!(base, chain_hash(1, GENESIS_HASH, "{ }"));
        assert!(hash_matches(1, GENESIS_HASH, "{}", &base));
        assert!(!hash_matches(2, GENESIS_HASH, "{}", &base));
        assert!(!hash_matches(1, GENESIS_HASH, "{}", "zz"));
        assert!(!hash_matches(
            1,
            GENESIS_HASH,
            "{}",
            &base.to_uppercase()[..63]
        ));
        assert_eq!(chain_hash(-7, "p", "x"), chain_hash(-7, "p", "x"));
        assert_eq!(base.len(), 64);
    }
}
