//! Every audit event kind lanyard writes. The strings are stable: auditors filter on
//! them and SIEM rules match them.
//!
//! | kind | written when |
//! |---|---|
//! | `exchange.granted` | an exchange issued a credential |
//! | `exchange.denied` | an exchange was refused (with the reason code) |
//! | `grant.renewed` / `grant.renew_denied` | a renew succeeded / was refused |
//! | `grant.released` / `grant.release_denied` | a release succeeded / was refused |
//! | `revocation.requested` | an operator (or an issuer kill switch) started a revocation job: selector, reason, grants matched, deny entry |
//! | `revocation.receipt` | a destination handled some of a job's grants: outcome, count, signed receipt's hash |
//! | `revocation.completed` | every grant of a job reached a final outcome |
//! | `revocation.abandoned` | an operator gave up on a job's failed steps |
//! | `deny_entry.put` / `deny_entry.delete` | a deny entry was lifted (written with the job that creates one) |
//! | `issuer.put` / `issuer.delete` | an issuer was registered, changed or removed (before/after) |
//! | `trust_rule.put` / `trust_rule.delete` | the same for trust rules |
//! | `destination.put` / `destination.delete` | the same for destinations |
//! | `policy.put` / `policy.activated` | a policy version was stored / activated |
//! | `signing_key.rotated` | lanyard's signing key was rotated |
//! | `issuer.keys_fetch_failed` / `issuer.keys_fetch_recovered` | an issuer's keys could not be fetched / could again |
//! | `admin.explain` | an operator asked for an explanation (no credential issued) |
//! | `audit.checkpoint` | a signed checkpoint of the chain head |

/// An exchange issued a credential.
pub const EXCHANGE_GRANTED: &str = "exchange.granted";
/// An exchange was refused.
pub const EXCHANGE_DENIED: &str = "exchange.denied";
/// A grant was renewed.
pub const GRANT_RENEWED: &str = "grant.renewed";
/// A renew was refused.
pub const GRANT_RENEW_DENIED: &str = "grant.renew_denied";
/// A grant was released by its holder.
pub const GRANT_RELEASED: &str = "grant.released";
/// A release was refused.
pub const GRANT_RELEASE_DENIED: &str = "grant.release_denied";
/// lanyard's signing key was rotated.
pub const SIGNING_KEY_ROTATED: &str = "signing_key.rotated";
/// An issuer's key set could not be fetched (written on the change from working to failing).
pub const ISSUER_KEYS_FETCH_FAILED: &str = "issuer.keys_fetch_failed";
/// An issuer's key set was fetched again after failures.
pub const ISSUER_KEYS_FETCH_RECOVERED: &str = "issuer.keys_fetch_recovered";
/// A policy version was stored.
pub const POLICY_PUT: &str = "policy.put";
/// A policy version was activated.
pub const POLICY_ACTIVATED: &str = "policy.activated";
/// A revocation job was created (the grants it matched stop being active at once).
pub const REVOCATION_REQUESTED: &str = "revocation.requested";
/// A destination handled some of a job's grants (one signed receipt).
pub const REVOCATION_RECEIPT: &str = "revocation.receipt";
/// Every grant of a revocation job reached a final outcome.
pub const REVOCATION_COMPLETED: &str = "revocation.completed";
/// An operator gave up on a revocation job's failed steps.
pub const REVOCATION_ABANDONED: &str = "revocation.abandoned";
/// An operator pulled a destination's own kill switch (`DisableDestination` with
/// `at_destination`); `detail.outcome` is `done`, `unsupported` or `failed`.
pub const DESTINATION_KILL_SWITCH: &str = "destination.kill_switch";
/// One request forwarded (or refused) by the proxy for a static-key destination:
/// method, the matched rule's path pattern, status, bytes; never bodies, queries or keys.
pub const PROXY_REQUEST: &str = "proxy.request";
/// An operator set or rotated a destination's static key (never the key itself).
pub const DESTINATION_SECRET_PUT: &str = "destination_secret.put";
/// A destination's static key was removed (with its destination).
pub const DESTINATION_SECRET_DELETE: &str = "destination_secret.delete";
/// An operator ran Explain.
pub const ADMIN_EXPLAIN: &str = "admin.explain";
/// A signed checkpoint of the chain head.
pub const AUDIT_CHECKPOINT: &str = "audit.checkpoint";

/// The kind written when a configuration object of `kind` (`issuer`, `trust_rule`,
/// `destination`) is put.
pub fn config_put(kind: &str) -> String {
    format!("{kind}.put")
}

/// The kind written when a configuration object of `kind` is deleted.
pub fn config_delete(kind: &str) -> String {
    format!("{kind}.delete")
}
