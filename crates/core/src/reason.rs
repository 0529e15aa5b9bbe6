//! Stable, machine-readable reason codes. They travel on the wire (gRPC error details and
//! the `lanyard-reason` metadata key), in audit events and in metrics, so a code once
//! published never changes its spelling.

use serde::{Deserialize, Serialize};

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident => $s:literal ),* $(,)?) => {
        /// Why a request was refused or failed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum ReasonCode { $( $(#[$doc])* $name ),* }

        impl ReasonCode {
            /// Every reason code, for documentation and tests.
            pub const ALL: &'static [ReasonCode] = &[ $(ReasonCode::$name),* ];
            /// The stable wire spelling, e.g. `TOKEN_EXPIRED`.
            pub const fn as_str(self) -> &'static str {
                match self { $(ReasonCode::$name => $s),* }
            }
            /// Parse the wire spelling.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(ReasonCode::$name),)* _ => None }
            }
        }
    };
}

reasons! {
    /// The token is not a well-formed compact JWS/JWT.
    TokenMalformed => "TOKEN_MALFORMED",
    /// The token is larger than the configured limit; it was not parsed.
    TokenTooLarge => "TOKEN_TOO_LARGE",
    /// `exp` is in the past (beyond leeway).
    TokenExpired => "TOKEN_EXPIRED",
    /// `nbf` or `iat` is in the future (beyond leeway).
    TokenNotYetValid => "TOKEN_NOT_YET_VALID",
    /// `iat` is older than the issuer's maximum token age.
    TokenTooOld => "TOKEN_TOO_OLD",
    /// The signature does not verify.
    SignatureInvalid => "SIGNATURE_INVALID",
    /// The token's `jti` was seen before and replay protection is on.
    TokenReplayed => "TOKEN_REPLAYED",
    /// The token's `typ` marks it as a token lanyard issued, or a type not accepted.
    TokenTypeRejected => "TOKEN_TYPE_REJECTED",
    /// The header carries `jku`, `x5u`, `jwk`, `x5c` or `crit`.
    TokenHeaderRejected => "TOKEN_HEADER_REJECTED",
    /// The claims JSON has a duplicate key.
    TokenDuplicateClaim => "TOKEN_DUPLICATE_CLAIM",
    /// `alg` is not allowed for this issuer or this key.
    AlgorithmNotAllowed => "ALGORITHM_NOT_ALLOWED",
    /// No key with the token's `kid` at the issuer, even after a refetch.
    KeyUnknown => "KEY_UNKNOWN",
    /// `iss` names no registered issuer.
    IssuerUnknown => "ISSUER_UNKNOWN",
    /// The issuer's keys could not be fetched and no fresh-enough copy is held.
    IssuerUnavailable => "ISSUER_UNAVAILABLE",
    /// `aud` does not contain an audience this issuer is configured to accept.
    AudienceMismatch => "AUDIENCE_MISMATCH",
    /// A required claim is missing.
    ClaimMissing => "CLAIM_MISSING",
    /// A claim has the wrong type or value.
    ClaimInvalid => "CLAIM_INVALID",
    /// The token verified, but no trust rule maps it to a workload.
    NoTrustRule => "NO_TRUST_RULE",
    /// Policy denied the request.
    PolicyDenied => "POLICY_DENIED",
    /// The destination is not configured.
    DestinationUnknown => "DESTINATION_UNKNOWN",
    /// The destination could not issue or revoke, for a reason that is neither a refusal
    /// nor an outage (kept for receipts of failed revocations).
    DestinationFailed => "DESTINATION_FAILED",
    /// The destination refused the request (its own error code, when safe to pass on, is
    /// in the message); retrying the same request will not help.
    DestinationRejected => "DESTINATION_REJECTED",
    /// The destination could not be reached, timed out, or failed in a way a retry may
    /// fix.
    DestinationUnavailable => "DESTINATION_UNAVAILABLE",
    /// A requested scope is not offered by the destination.
    ScopeNotAllowed => "SCOPE_NOT_ALLOWED",
    /// The requested TTL is invalid.
    TtlInvalid => "TTL_INVALID",
    /// No such grant.
    GrantNotFound => "GRANT_NOT_FOUND",
    /// The grant is released, revoked or expired.
    GrantNotActive => "GRANT_NOT_ACTIVE",
    /// The proof presented is for another workload or task than the grant's.
    GrantMismatch => "GRANT_MISMATCH",
    /// A request field is missing or malformed.
    InvalidArgument => "INVALID_ARGUMENT",
    /// The request is larger than allowed.
    RequestTooLarge => "REQUEST_TOO_LARGE",
    /// The named object does not exist.
    NotFound => "NOT_FOUND",
    /// The object already exists, or a concurrent change won.
    Conflict => "CONFLICT",
    /// The configuration object is invalid.
    ConfigInvalid => "CONFIG_INVALID",
    /// The store could not be reached; nothing was changed.
    StoreUnavailable => "STORE_UNAVAILABLE",
    /// Delegation refused: the chain is too deep, or the actor asked for more scope or
    /// time than its own token allows, or a delegated grant was to be renewed.
    DelegationDenied => "DELEGATION_DENIED",
    /// The destination requires an audit sink that is behind (or not running); the
    /// exchange is refused until it catches up.
    AuditDeliveryLagging => "AUDIT_DELIVERY_LAGGING",
    /// The grant was revoked by an operator (or an issuer kill switch); it cannot be
    /// renewed or released.
    GrantRevoked => "GRANT_REVOKED",
    /// The workload is on a deny list after a revocation; new exchanges are refused
    /// until the entry expires or is lifted.
    WorkloadDenied => "WORKLOAD_DENIED",
    /// The issuer was distrusted (kill switch); its tokens are refused until an operator
    /// lifts the entry.
    IssuerDistrusted => "ISSUER_DISTRUSTED",
    /// An operator pulled the destination's kill switch; exchanges for it are refused
    /// until the entry is lifted.
    DestinationDisabled => "DESTINATION_DISABLED",
    /// The proxy refused a request it will not forward as sent (path traversal, header
    /// smuggling, a second key header).
    ProxyDenied => "PROXY_DENIED",
    /// The grant made more requests through the proxy than its destination allows per
    /// minute; `Retry-After` says when to try again.
    RateLimited => "RATE_LIMITED",
    /// The RPC is defined but not served by this version.
    Unimplemented => "UNIMPLEMENTED",
    /// An internal error; the server log has the cause.
    Internal => "INTERNAL",
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in ReasonCode::ALL {
            assert_eq!(ReasonCode::parse(r.as_str()), Some(*r));
            assert!(seen.insert(r.as_str()));
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }
}
