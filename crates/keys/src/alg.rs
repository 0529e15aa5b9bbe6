//! The algorithms lanyard signs with. RSA is deliberately absent: signing with RSA
//! private keys is exposed to RUSTSEC-2023-0071 (Marvin), and every destination that
//! federates accepts ES256.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An algorithm for lanyard's own signing keys. Variants carry their JOSE names.
#[allow(clippy::upper_case_acronyms)] // the JOSE spelling, as in `jsonwebtoken::Algorithm`
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub enum SigningAlgorithm {
    /// ECDSA on P-256 with SHA-256. The default: every federating destination accepts it,
    /// and SPIFFE JWT-SVID validators do not accept EdDSA.
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
}

impl SigningAlgorithm {
    /// Every supported algorithm.
    pub const ALL: &'static [SigningAlgorithm] =
        &[SigningAlgorithm::ES256, SigningAlgorithm::EdDSA];

    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::ES256 => "ES256",
            SigningAlgorithm::EdDSA => "EdDSA",
        }
    }

    /// The matching `jsonwebtoken` algorithm.
    pub fn jwt_algorithm(self) -> jsonwebtoken::Algorithm {
        match self {
            SigningAlgorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            SigningAlgorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The algorithm name is not one lanyard signs with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported signing algorithm {0:?}: expected ES256 or EdDSA")]
pub struct UnsupportedAlgorithm(pub String);

impl FromStr for SigningAlgorithm {
    type Err = UnsupportedAlgorithm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SigningAlgorithm::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnsupportedAlgorithm(s.chars().take(32).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(SigningAlgorithm::default(), SigningAlgorithm::ES256);
        for a in SigningAlgorithm::ALL {
            let json = serde_json::to_string(a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.as_str()));
            assert_eq!(serde_json::from_str::<SigningAlgorithm>(&json).unwrap(), *a);
            assert_eq!(a.as_str().parse::<SigningAlgorithm>().unwrap(), *a);
        }
        assert!("RS256".parse::<SigningAlgorithm>().is_err());
        assert!(serde_json::from_str::<SigningAlgorithm>("\"RS256\"").is_err());
    }
}
