//! Key material: generating a key pair, reading one back from PKCS#8 DER, deriving its
//! `kid` and public JWK, and signing with it. Private keys stay inside aws-lc-rs key
//! pairs (aws-lc cleanses key memory when it frees it).
//!
//! Signing is written here rather than through `jsonwebtoken::encode`: that re-parses the
//! PKCS#8 DER on every call, and for P-256 the parse checks the public point against the
//! private scalar (a full scalar multiplication, about 20 µs, as much as the signature
//! itself). The key pair is parsed once, at load.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::SigningAlgorithm;

/// A usable signing key.
pub(crate) struct KeyMaterial {
    /// base64url of the first 16 bytes of SHA-256 over the raw public key.
    pub(crate) kid: String,
    /// The public key as a JWK (`kid`, `alg` and `use` set).
    pub(crate) jwk: serde_json::Value,
    /// The parsed private key.
    pub(crate) signer: Signer,
}

/// A parsed private key, ready to sign JWS messages.
pub(crate) enum Signer {
    /// P-256 with SHA-256; signatures are `r || s` (64 bytes), as JWS ES256 wants.
    Es256(EcdsaKeyPair),
    /// Ed25519; signatures are 64 bytes.
    EdDsa(Ed25519KeyPair),
}

impl Signer {
    /// The JWS signature over `message` (the ASCII `header.payload`).
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Signer::Es256(pair) => pair
                .sign(&SystemRandom::new(), message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| "ECDSA P-256 signing failed".to_owned()),
            Signer::EdDsa(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }
}

/// A fresh key pair and its PKCS#8 DER encoding (v1 for P-256, v2 for Ed25519).
pub(crate) fn generate(alg: SigningAlgorithm) -> Result<(KeyMaterial, Vec<u8>), String> {
    let rng = SystemRandom::new();
    let der = match alg {
        SigningAlgorithm::ES256 => {
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        }
        SigningAlgorithm::EdDSA => Ed25519KeyPair::generate_pkcs8(&rng),
    }
    .map_err(|_| format!("generating an {alg} key pair failed"))?
    .as_ref()
    .to_vec();
    let material = from_pkcs8(alg, &der)?;
    Ok((material, der))
}

/// Parse a PKCS#8 DER private key of `alg` and derive its public parts.
pub(crate) fn from_pkcs8(alg: SigningAlgorithm, der: &[u8]) -> Result<KeyMaterial, String> {
    match alg {
        SigningAlgorithm::ES256 => {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                .map_err(|e| format!("not a PKCS#8 P-256 private key: {e}"))?;
            let point = pair.public_key().as_ref();
            // Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
            let (x, y) = match point {
                [0x04, rest @ ..] if rest.len() == 64 => rest.split_at(32),
                _ => return Err("unexpected P-256 public key encoding".into()),
            };
            let kid = kid_for(point);
            let jwk = json!({
                "kty": "EC", "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
                "kid": kid, "alg": alg.as_str(), "use": "sig",
            });
            Ok(KeyMaterial {
                kid,
                jwk,
                signer: Signer::Es256(pair),
            })
        }
        SigningAlgorithm::EdDSA => {
            let pair = Ed25519KeyPair::from_pkcs8(der)
                .map_err(|e| format!("not a PKCS#8 Ed25519 private key: {e}"))?;
            let public = pair.public_key().as_ref();
            let kid = kid_for(public);
            let jwk = json!({
                "kty": "OKP", "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(public),
                "kid": kid, "alg": alg.as_str(), "use": "sig",
            });
            Ok(KeyMaterial {
                kid,
                jwk,
                signer: Signer::EdDsa(pair),
            })
        }
    }
}

/// The key ID for a raw public key.
fn kid_for(public_key: &[u8]) -> String {
    let digest = Sha256::digest(public_key);
    URL_SAFE_NO_PAD.encode(&digest[..16])
}

/// Whether `kid` looks like one lanyard made (22 base64url characters). Checked before a
/// `kid` read from `keys.json` becomes part of a file name.
pub(crate) fn is_valid_kid(kid: &str) -> bool {
    kid.len() == 22
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_keys_round_trip_through_der() {
        for alg in SigningAlgorithm::ALL {
            let (m, der) = generate(*alg).unwrap();
            assert!(is_valid_kid(&m.kid), "{}", m.kid);
            let again = from_pkcs8(*alg, &der).unwrap();
            assert_eq!(again.kid, m.kid);
            assert_eq!(again.jwk, m.jwk);
            // The wrong algorithm is refused, not misread.
            let other = if *alg == SigningAlgorithm::ES256 {
                SigningAlgorithm::EdDSA
            } else {
                SigningAlgorithm::ES256
            };
            assert!(from_pkcs8(other, &der).is_err());
        }
    }

    #[test]
    fn kids_are_unique() {
        let mut seen = HashSet::new();
        for i in 0..64 {
            let alg = SigningAlgorithm::ALL[i % 2];
            let (m, _) = generate(alg).unwrap();
            assert!(seen.insert(m.kid));
        }
    }

    #[test]
    fn kid_validation() {
        assert!(!is_valid_kid("../../etc/passwd"));
        assert!(!is_valid_kid(""));
        assert!(is_valid_kid("abcdefghijklmnopqrstu_"));
        assert!(!is_valid_kid("abcdefghijklmnopqrst/_"));
    }
}
