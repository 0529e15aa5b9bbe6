//! The audit stream's rules: which events exist, how a token is named without being
//! stored (HMAC fingerprints), signed checkpoints, proving a chain intact (or saying
//! exactly where and how it breaks), and delivering events to sinks.
//!
//! The store keeps the durable copy and the hash-chain arithmetic
//! ([`lanyard_store::chain_hash`]); this crate builds on it and knows nothing of gRPC.

pub mod checkpoint;
pub mod fingerprint;
pub mod kinds;
pub mod sink;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointVerifier};
pub use fingerprint::{FingerprintError, Fingerprinter};
pub use verify::{BreakKind, Breakage, VerifyError, VerifyOptions, VerifyReport, verify_chain};
