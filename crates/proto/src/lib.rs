//! The lanyard.v1 gRPC API: prost/tonic code generated from `proto/` (checked in under
//! `src/gen`, kept honest by `tests/bootstrap.rs`) and the encoded descriptor set for
//! server reflection. Client code is behind the `client` feature, server code behind
//! `server`. Messages that carry secrets have a redacting `Debug`.

#![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]

/// Generated messages and services of package `lanyard.v1`.
pub mod v1 {
    include!("gen/lanyard.v1.rs");

    macro_rules! redacted_debug {
        ($t:ty { $($shown:ident),* } [$($secret:ident),*]) => {
            impl std::fmt::Debug for $t {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    let mut d = f.debug_struct(stringify!($t));
                    $( d.field(stringify!($shown), &self.$shown); )*
                    $( d.field(stringify!($secret), &format_args!("<{} bytes redacted>", self.$secret.len())); )*
                    d.finish()
                }
            }
        };
    }

    redacted_debug!(ExchangeRequest { subject_token_type, actor_token_type, destination, scopes, requested_ttl_seconds, audience } [subject_token, actor_token]);
    redacted_debug!(
        RenewRequest {
            grant_id,
            subject_token_type,
            requested_ttl_seconds
        }[subject_token]
    );
    redacted_debug!(
        ReleaseRequest {
            grant_id,
            subject_token_type
        }[subject_token]
    );
    redacted_debug!(
        ExplainRequest {
            destination,
            scopes,
            requested_ttl_seconds
        }[subject_token]
    );
    redacted_debug!(
        BearerToken {
            token_type,
            issued_token_type,
            header
        }[token]
    );
    redacted_debug!(AwsCredentials { access_key_id, region } [secret_access_key, session_token]);
    redacted_debug!(FingerprintRequest {}[token]);
    redacted_debug!(IntrospectRequest { client_token_type } [token, client_token]);
    redacted_debug!(PutDestinationSecretRequest { destination }[secret]);
    redacted_debug!(
        DatabaseCredentials {
            host,
            port,
            database,
            username
        }[password]
    );
}

/// The encoded `FileDescriptorSet` of every lanyard.v1 file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/descriptor.bin");

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn debug_redacts_secrets() {
        let r = ExchangeRequest {
            subject_token: "eyJ.secret-token.sig".into(),
            destination: "orders".into(),
            ..Default::default()
        };
        let s = format!("{r:?}");
        assert!(!s.contains("secret-token"), "{s}");
        assert!(s.contains("orders"));
        let b = BearerToken {
            token: "tok-abc".into(),
            ..Default::default()
        };
        assert!(!format!("{b:?}").contains("tok-abc"));
        let k = PutDestinationSecretRequest {
            destination: "claude".into(),
            secret: "sk-static-key".into(),
        };
        let s = format!("{k:?}");
        assert!(!s.contains("sk-static-key") && s.contains("claude"), "{s}");
    }

    #[test]
    fn descriptor_decodes() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        assert!(fds.file.iter().any(|f| f.package() == "lanyard.v1"));
    }
}
