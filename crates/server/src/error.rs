//! Errors reach the wire here and only here. Every crate error becomes an [`ApiError`]
//! (a stable [`ReasonCode`] plus a message safe to show the caller), and every
//! `ApiError` becomes a `tonic::Status` with the reason in a `google.rpc.ErrorInfo`
//! detail (domain `lanyard.dev`) and in the `lanyard-reason` metadata key.
//!
//! ## Why
//! The cause of an internal failure is logged with the request ID, never returned: a
//! message must help the legitimate caller without helping an attacker, and must never
//! echo token contents.

use lanyard_core::ReasonCode;
use lanyard_destination::DestinationError;
use lanyard_store::StoreError;
use lanyard_trust::TrustError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The error domain in `google.rpc.ErrorInfo`.
pub const ERROR_DOMAIN: &str = "lanyard.dev";
/// The metadata key carrying the reason code.
pub const REASON_METADATA_KEY: &str = "lanyard-reason";

/// An error on its way to the caller.
#[derive(Debug)]
pub struct ApiError {
    /// Stable reason.
    pub reason: ReasonCode,
    /// Message for the caller. Never contains token text or secrets.
    pub message: String,
}

impl ApiError {
    /// An error with a reason and message.
    pub fn new(reason: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
    /// A bad request field.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ReasonCode::InvalidArgument, message)
    }
    /// An internal failure: logs `cause` and returns a message without it.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            ReasonCode::Internal,
            "internal error; the server log has the cause",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// The gRPC code for a reason. Exhaustive: a new reason must choose its code here.
pub fn code_for(reason: ReasonCode) -> Code {
    use ReasonCode as R;
    match reason {
        R::TokenMalformed
        | R::TokenTooLarge
        | R::TokenExpired
        | R::TokenNotYetValid
        | R::TokenTooOld
        | R::SignatureInvalid
        | R::TokenReplayed
        | R::TokenTypeRejected
        | R::TokenHeaderRejected
        | R::TokenDuplicateClaim
        | R::AlgorithmNotAllowed
        | R::KeyUnknown
        | R::IssuerUnknown
        | R::AudienceMismatch
        | R::ClaimMissing
        | R::ClaimInvalid => Code::Unauthenticated,
        R::NoTrustRule
        | R::PolicyDenied
        | R::GrantMismatch
        | R::DelegationDenied
        | R::WorkloadDenied
        | R::IssuerDistrusted => Code::PermissionDenied,
        R::IssuerUnavailable
        | R::StoreUnavailable
        | R::DestinationFailed
        | R::DestinationUnavailable
        | R::AuditDeliveryLagging => Code::Unavailable,
        R::DestinationUnknown | R::GrantNotFound | R::NotFound => Code::NotFound,
        R::ScopeNotAllowed | R::TtlInvalid | R::InvalidArgument | R::ConfigInvalid => {
            Code::InvalidArgument
        }
        R::GrantNotActive | R::GrantRevoked | R::DestinationRejected | R::DestinationDisabled => {
            Code::FailedPrecondition
        }
        R::RequestTooLarge | R::RateLimited => Code::ResourceExhausted,
        R::ProxyDenied => Code::InvalidArgument,
        R::Conflict => Code::Aborted,
        R::Unimplemented => Code::Unimplemented,
        R::Internal => Code::Internal,
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let details = ErrorDetails::with_error_info(
            e.reason.as_str(),
            ERROR_DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        );
        let mut status = Status::with_error_details(code_for(e.reason), e.message, details);
        if let Ok(v) = e.reason.as_str().parse() {
            status.metadata_mut().insert(REASON_METADATA_KEY, v);
        }
        status
    }
}

impl From<TrustError> for ApiError {
    fn from(e: TrustError) -> Self {
        // Trust errors are written for the caller: no token text, no unverified claim values.
        ApiError::new(e.reason(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => {
                ApiError::new(ReasonCode::NotFound, format!("{what} not found"))
            }
            StoreError::Conflict(m) => ApiError::new(ReasonCode::Conflict, m),
            StoreError::Unavailable(cause) => {
                tracing::error!(error = %cause, "store unavailable");
                ApiError::new(
                    ReasonCode::StoreUnavailable,
                    "the store is unavailable; nothing was changed, retry later",
                )
            }
            StoreError::Corrupt(m) => ApiError::internal(&format!("corrupt store data: {m}")),
        }
    }
}

impl From<DestinationError> for ApiError {
    fn from(e: DestinationError) -> Self {
        match e {
            DestinationError::InvalidSettings { .. } => {
                ApiError::new(ReasonCode::ConfigInvalid, e.to_string())
            }
            DestinationError::BadRequest(m) => ApiError::new(ReasonCode::InvalidArgument, m),
            DestinationError::Mint(cause) => {
                ApiError::internal(&format!("minting failed: {cause}"))
            }
            DestinationError::Upstream { message, retryable } => {
                tracing::warn!(%message, retryable, "destination call failed");
                if retryable {
                    ApiError::new(
                        ReasonCode::DestinationUnavailable,
                        format!("the destination is unavailable, retry later: {message}"),
                    )
                } else {
                    ApiError::new(
                        ReasonCode::DestinationRejected,
                        format!("the destination refused: {message}"),
                    )
                }
            }
        }
    }
}

/// Read the reason code from a status (for clients and tests).
pub fn reason_of(status: &Status) -> Option<ReasonCode> {
    status
        .get_details_error_info()
        .and_then(|i| ReasonCode::parse(&i.reason))
        .or_else(|| {
            status
                .metadata()
                .get(REASON_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .and_then(ReasonCode::parse)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_reason_in_details_and_metadata() {
        let s: Status = ApiError::new(ReasonCode::TokenExpired, "token expired").into();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(reason_of(&s), Some(ReasonCode::TokenExpired));
        assert_eq!(
            s.metadata().get(REASON_METADATA_KEY).unwrap(),
            "TOKEN_EXPIRED"
        );
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn every_reason_has_a_code() {
        for r in ReasonCode::ALL {
            let _ = code_for(*r);
        }
        assert_eq!(code_for(ReasonCode::PolicyDenied), Code::PermissionDenied);
        assert_eq!(code_for(ReasonCode::DestinationUnknown), Code::NotFound);
    }
}
