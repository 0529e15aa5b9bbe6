//! lanyard-trust owns trust in upstream identity: issuer configuration, fetching and
//! caching issuer keys (OIDC discovery, JWKS URL, inline JWKS), verifying workload
//! subject tokens (JWTs), and trust rules that turn verified claims into a canonical
//! workload ID.
//!
//! The flow is [`Verifier::verify`] (a [`Secret`](lanyard_core::Secret) token in, a
//! [`VerifiedToken`] out) followed by [`match_trust_rules`] (a [`Workload`] out). Every
//! refusal is a [`TrustError`] with a stable [`ReasonCode`](lanyard_core::ReasonCode).
//! The one service this crate needs from outside, the `jti` replay check, is the
//! [`ReplayGuard`] trait; the server wires in a shared implementation.

mod config;
mod error;
mod fetch;
mod json;
mod jwk;
mod replay;
mod rules;
mod verifier;

#[cfg(test)]
mod examples;
#[cfg(test)]
mod testutil;

pub use config::{
    Algorithm, DEFAULT_LEEWAY_SECS, DEFAULT_MAX_TOKEN_BYTES, IssuerConfig, KeySource,
    MAX_LEEWAY_SECS, UnsupportedAlgorithm, validate_issuers,
};
pub use error::{Result, TrustError};
pub use replay::{InMemoryReplayGuard, ReplayError, ReplayGuard};
pub use rules::{ClaimCondition, ClaimMatcher, TrustRule, Workload, match_trust_rules};
pub use verifier::{FetchCounts, KeySetStatus, VerifiedToken, Verifier, VerifierSettings};
