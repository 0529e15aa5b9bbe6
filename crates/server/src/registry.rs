//! The one registry of destination adapters: a configured `kind` maps to a constructor.
//! Unknown kinds are refused when the destination is put, not when it is first used.

use std::sync::Arc;

use lanyard_destination::{Destination, DestinationError, DestinationSpec, Sealer, TokenMinter};
use lanyard_destination_aws_sts::AwsStsDestination;
use lanyard_destination_azure::AzureDestination;
use lanyard_destination_claude::ClaudeDestination;
use lanyard_destination_gcp_sts::GcpStsDestination;
use lanyard_destination_jwt::JwtDestination;
use lanyard_destination_oauth2::OAuth2Destination;
use lanyard_destination_openai::OpenAiDestination;
use lanyard_destination_postgres::PostgresDestination;
use lanyard_destination_proxy::ProxyDestination;

/// Adapter kinds this build knows.
pub const KINDS: &[&str] = &[
    "jwt", "postgres", "claude", "openai", "gcp-sts", "azure", "oauth2", "aws-sts", "proxy",
];
/// Kinds whose expired grants must be revoked at the destination (their
/// `revoke_at_expiry` is true): the expiry sweep leaves their grants to clean-up jobs,
/// decided by the stored kind so that a replica that could not build the adapter does
/// not expire them either.
pub const REVOKED_AT_EXPIRY: &[&str] = &["postgres"];

/// Validate a spec and build its adapter. `minter` signs the assertions adapters send;
/// `sealer` keeps what an adapter must hold to revoke later (an RFC 7009 token).
///
/// # Errors
/// [`DestinationError::InvalidSettings`] for bad common settings, an unknown kind, or
/// settings the adapter refuses.
pub fn build(
    spec: &DestinationSpec,
    minter: Arc<dyn TokenMinter>,
    sealer: Arc<dyn Sealer>,
) -> Result<Arc<dyn Destination>, DestinationError> {
    spec.validate()?;
    match spec.kind.as_str() {
        "jwt" => Ok(Arc::new(JwtDestination::new(spec, minter)?)),
        "postgres" => Ok(Arc::new(PostgresDestination::new(spec)?)),
        "claude" => Ok(Arc::new(ClaudeDestination::new(spec, minter)?)),
        "openai" => Ok(Arc::new(OpenAiDestination::new(spec, minter)?)),
        "aws-sts" => Ok(Arc::new(AwsStsDestination::new(spec, minter)?)),
        "gcp-sts" => Ok(Arc::new(GcpStsDestination::new(spec, minter)?)),
        "azure" => Ok(Arc::new(AzureDestination::new(spec, minter)?)),
        "oauth2" => Ok(Arc::new(OAuth2Destination::new(spec, minter, sealer)?)),
        "proxy" => Ok(Arc::new(ProxyDestination::new(spec, minter)?)),
        other => Err(DestinationError::InvalidSettings {
            kind: other.chars().take(64).collect(),
            message: format!(
                "unknown destination kind; known kinds: {}",
                KINDS.join(", ")
            ),
        }),
    }
}
