//! [`TrustError`], the one error type of this crate, and its mapping to stable
//! [`ReasonCode`]s.
//!
//! ## Why messages are built only from trusted parts
//! Messages reach the legitimate caller (through the server's one `Status` mapping) and
//! the logs. They may name an issuer by its configured name, a claim by its configured
//! path, or a configured limit, but never echo token text, header values or claim values
//! of a token: those are attacker-controlled until the signature verifies, and even
//! after it they are not ours to repeat.

use lanyard_core::ReasonCode;

use crate::replay::ReplayError;

/// `Result` with [`TrustError`] as the default error.
pub type Result<T, E = TrustError> = std::result::Result<T, E>;

/// Why a token was refused, or a configuration or key set is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The token is larger than the issuer's `max_token_bytes`; it was not parsed.
    #[error("token is {size} bytes, over the limit of {max} bytes")]
    TokenTooLarge {
        /// Size of the presented token in bytes.
        size: usize,
        /// The limit that applied.
        max: usize,
    },
    /// The token is not a compact JWS with a JSON object header and payload.
    #[error("token is malformed: {0}")]
    TokenMalformed(&'static str),
    /// The header or payload JSON repeats a key at some object level.
    #[error("token {0} has a duplicate json key")]
    TokenDuplicateClaim(&'static str),
    /// The header carries a parameter lanyard refuses (`crit`, `jku`, `x5u`, `jwk`, `x5c`).
    #[error("token header parameter `{0}` is not accepted")]
    TokenHeaderRejected(&'static str),
    /// The token's `typ` is not a plain JWT, or the token is one lanyard issued.
    #[error("{0}")]
    TokenTypeRejected(&'static str),
    /// `iss` names no registered issuer.
    #[error("token issuer is not registered")]
    IssuerUnknown,
    /// The issuer's keys could not be fetched and no fresh-enough copy is held.
    #[error("keys of issuer `{issuer}` are unavailable: {detail}")]
    IssuerUnavailable {
        /// The issuer's configured name.
        issuer: String,
        /// What went wrong (configured URLs, HTTP status, limits; never key material).
        detail: String,
    },
    /// `alg` is not allowed for this issuer or does not fit the selected key.
    #[error("algorithm not allowed: {0}")]
    AlgorithmNotAllowed(String),
    /// No key of the issuer matches the token's `kid`, even after a refetch.
    #[error("no key of issuer `{issuer}` matches the token's key id")]
    KeyUnknown {
        /// The issuer's configured name.
        issuer: String,
    },
    /// The signature does not verify with the selected key.
    #[error("token signature does not verify")]
    SignatureInvalid,
    /// `exp` is in the past, beyond the leeway.
    #[error("token has expired")]
    TokenExpired,
    /// `nbf` or `iat` is in the future, beyond the leeway.
    #[error("token is not yet valid: `{0}` is in the future")]
    TokenNotYetValid(&'static str),
    /// `iat` is older than the issuer's `max_token_age_secs`.
    #[error("token is older than the issuer's maximum age of {max_secs} s")]
    TokenTooOld {
        /// The configured maximum age.
        max_secs: u32,
    },
    /// `aud` has no audience this issuer is configured to accept.
    #[error("token audience is not accepted for issuer `{issuer}`")]
    AudienceMismatch {
        /// The issuer's configured name.
        issuer: String,
    },
    /// A required claim is absent. The name is a standard claim or a configured path.
    #[error("required claim `{0}` is missing")]
    ClaimMissing(String),
    /// A claim has the wrong type or a value that cannot be used.
    #[error("claim `{claim}` is invalid: {why}")]
    ClaimInvalid {
        /// A standard claim name or a configured claim path.
        claim: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The token's `jti` was seen before.
    #[error("token was already used (its jti was seen before)")]
    TokenReplayed,
    /// The replay guard could not answer; the token is refused (fail closed).
    #[error("replay check failed")]
    ReplayCheck(#[source] ReplayError),
    /// The token verified but no trust rule of its issuer matches it.
    #[error("no trust rule of issuer `{issuer}` matches the token")]
    NoTrustRule {
        /// The issuer's configured name.
        issuer: String,
    },
    /// An issuer configuration or trust rule is invalid.
    #[error("invalid configuration: {0}")]
    ConfigInvalid(String),
}

impl TrustError {
    /// The stable reason code for the wire, audit and metrics.
    pub fn reason(&self) -> ReasonCode {
        match self {
            TrustError::TokenTooLarge { .. } => ReasonCode::TokenTooLarge,
            TrustError::TokenMalformed(_) => ReasonCode::TokenMalformed,
            TrustError::TokenDuplicateClaim(_) => ReasonCode::TokenDuplicateClaim,
            TrustError::TokenHeaderRejected(_) => ReasonCode::TokenHeaderRejected,
            TrustError::TokenTypeRejected(_) => ReasonCode::TokenTypeRejected,
            TrustError::IssuerUnknown => ReasonCode::IssuerUnknown,
            TrustError::IssuerUnavailable { .. } => ReasonCode::IssuerUnavailable,
            TrustError::AlgorithmNotAllowed(_) => ReasonCode::AlgorithmNotAllowed,
            TrustError::KeyUnknown { .. } => ReasonCode::KeyUnknown,
            TrustError::SignatureInvalid => ReasonCode::SignatureInvalid,
            TrustError::TokenExpired => ReasonCode::TokenExpired,
            TrustError::TokenNotYetValid(_) => ReasonCode::TokenNotYetValid,
            TrustError::TokenTooOld { .. } => ReasonCode::TokenTooOld,
            TrustError::AudienceMismatch { .. } => ReasonCode::AudienceMismatch,
            TrustError::ClaimMissing(_) => ReasonCode::ClaimMissing,
            TrustError::ClaimInvalid { .. } => ReasonCode::ClaimInvalid,
            TrustError::TokenReplayed => ReasonCode::TokenReplayed,
            TrustError::ReplayCheck(_) => ReasonCode::Internal,
            TrustError::NoTrustRule { .. } => ReasonCode::NoTrustRule,
            TrustError::ConfigInvalid(_) => ReasonCode::ConfigInvalid,
        }
    }

    pub(crate) fn claim_invalid(claim: &str, why: &'static str) -> Self {
        TrustError::ClaimInvalid {
            claim: claim.to_owned(),
            why,
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        TrustError::ConfigInvalid(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_send_sync_static() {
        fn assert_bounds<T: Send + Sync + 'static + std::error::Error>() {}
        assert_bounds::<TrustError>();
    }

    #[test]
    fn messages_are_lowercase_without_trailing_period() {
        let samples = [
            TrustError::TokenTooLarge { size: 2, max: 1 },
            TrustError::TokenMalformed("x"),
            TrustError::IssuerUnknown,
            TrustError::SignatureInvalid,
            TrustError::TokenExpired,
            TrustError::TokenReplayed,
            TrustError::KeyUnknown { issuer: "a".into() },
        ];
        for e in samples {
            let m = e.to_string();
            assert!(m.chars().next().is_some_and(|c| !c.is_uppercase()), "{m}");
            assert!(!m.ends_with('.'), "{m}");
        }
    }
}
