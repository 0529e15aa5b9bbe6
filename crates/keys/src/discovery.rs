//! The OIDC discovery document for lanyard as a workload issuer (modelled on SPIRE's
//! OIDC discovery provider): enough for destinations that federate (Claude, AWS, GCP,
//! Azure) to find lanyard's JWKS.

use serde_json::json;

use crate::SigningAlgorithm;

/// Path of the JWKS under the issuer URL.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Path of the discovery document under the issuer URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Path of RFC 7662 introspection for lanyard's own tokens (`POST`, advertised as
/// `introspection_endpoint`, RFC 8414).
pub const INTROSPECTION_PATH: &str = "/oauth2/introspect";

/// The document served at `{issuer_url}/.well-known/openid-configuration`.
///
/// `issuer` is `issuer_url` exactly as given (it must equal the `iss` of minted tokens);
/// endpoint URLs are joined to it without a doubled `/`. `algs` (usually
/// [`KeyRing::published_algorithms`](crate::KeyRing::published_algorithms)) is
/// deduplicated and sorted; when empty, the default algorithm is listed.
/// `authorization_endpoint` is present but empty, as in SPIRE, because the field is
/// REQUIRED by the spec and lanyard has no interactive flow. `introspection_endpoint`
/// (RFC 8414) is where resource servers check that a lanyard token is still active; its
/// callers authenticate with their own platform token, a method RFC 8414 has no name
/// for, so `introspection_endpoint_auth_methods_supported` is left out.
pub fn discovery_document(issuer_url: &str, algs: &[SigningAlgorithm]) -> serde_json::Value {
    let base = issuer_url.trim_end_matches('/');
    let mut algs = algs.to_vec();
    if algs.is_empty() {
        algs.push(SigningAlgorithm::default());
    }
    algs.sort();
    algs.dedup();
    let alg_names: Vec<&str> = algs.iter().map(|a| a.as_str()).collect();
    json!({
        "issuer": issuer_url,
        "jwks_uri": format!("{base}{JWKS_PATH}"),
        "introspection_endpoint": format!("{base}{INTROSPECTION_PATH}"),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": alg_names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_the_required_fields() {
        let doc = discovery_document(
            "https://lanyard.example.com",
            &[
                SigningAlgorithm::EdDSA,
                SigningAlgorithm::ES256,
                SigningAlgorithm::ES256,
            ],
        );
        assert_eq!(
            doc,
            json!({
                "issuer": "https://lanyard.example.com",
                "jwks_uri": "https://lanyard.example.com/.well-known/jwks.json",
                "introspection_endpoint": "https://lanyard.example.com/oauth2/introspect",
                "authorization_endpoint": "",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256", "EdDSA"],
            })
        );
    }

    #[test]
    fn trailing_slash_is_not_doubled_and_issuer_is_kept() {
        let doc = discovery_document("https://l.example/tenant/", &[]);
        assert_eq!(doc["issuer"], "https://l.example/tenant/");
        assert_eq!(
            doc["jwks_uri"],
            "https://l.example/tenant/.well-known/jwks.json"
        );
        assert_eq!(
            doc["introspection_endpoint"],
            "https://l.example/tenant/oauth2/introspect"
        );
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["ES256"])
        );
    }
}
