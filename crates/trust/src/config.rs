//! Issuer configuration: which upstream identity providers lanyard trusts, how their keys
//! are found, and the limits applied to their tokens.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrustError};
use crate::jwk;

/// Default clock leeway for `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY_SECS: u32 = 30;
/// Largest clock leeway an issuer may configure.
pub const MAX_LEEWAY_SECS: u32 = 300;
/// Default size limit of a subject token.
pub const DEFAULT_MAX_TOKEN_BYTES: u32 = 16 * 1024;
/// Largest `max_token_bytes` an issuer may configure.
pub(crate) const MAX_MAX_TOKEN_BYTES: u32 = 1024 * 1024;
/// Smallest `max_token_bytes` an issuer may configure.
pub(crate) const MIN_MAX_TOKEN_BYTES: u32 = 256;

const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";

/// A signature algorithm lanyard accepts on subject tokens.
///
/// ## Why no `HS*` and no `none`
/// A symmetric key would have to be shared with lanyard, and `none` is no signature.
/// There is no variant for them, so no configuration can allow them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RSA key of at least 2048 bits).
    RS256,
    /// RSASSA-PSS with SHA-256 (RSA key of at least 2048 bits).
    PS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

impl Algorithm {
    /// Every supported algorithm.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];

    /// The JOSE name, e.g. `RS256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::PS256 => "PS256",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    pub(crate) fn to_jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
            Algorithm::PS256 => jsonwebtoken::Algorithm::PS256,
            Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            Algorithm::ES384 => jsonwebtoken::Algorithm::ES384,
            Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The algorithm name is not one lanyard supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported algorithm (supported: RS256, PS256, ES256, ES384, EdDSA)")]
pub struct UnsupportedAlgorithm;

impl FromStr for Algorithm {
    type Err = UnsupportedAlgorithm;
    fn from_str(s: &str) -> Result<Self, UnsupportedAlgorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or(UnsupportedAlgorithm)
    }
}

/// Where an issuer's public keys come from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    /// OIDC discovery. `url` is the discovery document's URL; a URL that does not end in
    /// `/.well-known/openid-configuration` is taken as the issuer base and that suffix is
    /// appended. The document's `issuer` must equal the issuer's `issuer_url`.
    Discovery {
        /// Discovery document URL, or the issuer base URL.
        url: String,
    },
    /// A JWKS document fetched from a URL.
    JwksUrl {
        /// The JWKS URL.
        url: String,
    },
    /// A JWKS given inline in the configuration (`{"keys": [...]}`).
    InlineJwks {
        /// The JWK set.
        jwks: serde_json::Value,
    },
}

impl KeySource {
    /// The discovery document URL for a [`KeySource::Discovery`] `url`.
    pub fn discovery_document_url(url: &str) -> String {
        if url.ends_with(DISCOVERY_SUFFIX) {
            url.to_owned()
        } else {
            format!("{}{DISCOVERY_SUFFIX}", url.trim_end_matches('/'))
        }
    }
}

fn default_leeway() -> u32 {
    DEFAULT_LEEWAY_SECS
}

/// One upstream identity provider lanyard trusts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Operator-chosen id, `[a-z0-9-]{1,63}`. Trust rules refer to it.
    pub name: String,
    /// The exact `iss` expected in tokens.
    pub issuer_url: String,
    /// Where the keys come from.
    pub keys: KeySource,
    /// Algorithms accepted from this issuer; non-empty.
    pub allowed_algorithms: Vec<Algorithm>,
    /// Audiences accepted; non-empty. The token's `aud` must contain one of them.
    pub audiences: Vec<String>,
    /// Clock leeway for `exp`, `nbf` and `iat`; default 30, at most 300.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u32,
    /// If set, `iat` is required and `now - iat` may not exceed it.
    #[serde(default)]
    pub max_token_age_secs: Option<u32>,
    /// If set, `jti` is required and each `jti` is accepted once.
    #[serde(default)]
    pub replay_protection: bool,
    /// Size limit of a token; default 16384.
    #[serde(default)]
    pub max_token_bytes: Option<u32>,
}

impl IssuerConfig {
    /// The token size limit that applies to this issuer.
    pub fn effective_max_token_bytes(&self) -> usize {
        self.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES) as usize
    }

    /// Check the configuration before it is used.
    ///
    /// # Errors
    /// [`TrustError::ConfigInvalid`] naming the first problem found. An inline JWKS is
    /// parsed here: a symmetric (`oct`) key, a key lanyard cannot use, or a set with no
    /// key usable by `allowed_algorithms` is refused.
    pub fn validate(&self) -> Result<()> {
        let who = || format!("issuer `{}`", self.name);
        if !valid_name(&self.name) {
            return Err(TrustError::config(
                "issuer name must be 1-63 characters of [a-z0-9-]",
            ));
        }
        if self.issuer_url.is_empty()
            || self.issuer_url.len() > 1024
            || self
                .issuer_url
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(TrustError::config(format!(
                "{}: issuer_url must be 1-1024 characters without whitespace",
                who()
            )));
        }
        match &self.keys {
            KeySource::Discovery { url } | KeySource::JwksUrl { url } => {
                let parsed = reqwest::Url::parse(url).map_err(|_| {
                    TrustError::config(format!("{}: key source url is not a valid url", who()))
                })?;
                if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none() {
                    return Err(TrustError::config(format!(
                        "{}: key source url must be an http(s) url with a host",
                        who()
                    )));
                }
            }
            KeySource::InlineJwks { jwks } => {
                let keys = jwk::parse_inline_jwks(jwks)
                    .map_err(|why| TrustError::config(format!("{}: {why}", who())))?;
                if !keys
                    .iter()
                    .any(|k| self.allowed_algorithms.iter().any(|a| k.supports(*a)))
                {
                    return Err(TrustError::config(format!(
                        "{}: no inline key can verify any of the allowed algorithms",
                        who()
                    )));
                }
            }
        }
        if self.allowed_algorithms.is_empty() {
            return Err(TrustError::config(format!(
                "{}: allowed_algorithms must not be empty",
                who()
            )));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.is_empty()) {
            return Err(TrustError::config(format!(
                "{}: audiences must be a non-empty list of non-empty strings",
                who()
            )));
        }
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(TrustError::config(format!(
                "{}: leeway_secs must be at most {MAX_LEEWAY_SECS}",
                who()
            )));
        }
        if self.max_token_age_secs == Some(0) {
            return Err(TrustError::config(format!(
                "{}: max_token_age_secs must be positive when set",
                who()
            )));
        }
        if let Some(n) = self.max_token_bytes
            && !(MIN_MAX_TOKEN_BYTES..=MAX_MAX_TOKEN_BYTES).contains(&n)
        {
            return Err(TrustError::config(format!(
                "{}: max_token_bytes must be between {MIN_MAX_TOKEN_BYTES} and {MAX_MAX_TOKEN_BYTES}",
                who()
            )));
        }
        Ok(())
    }
}

/// Validate a whole issuer set: each config, plus unique names and unique `issuer_url`s.
///
/// # Errors
/// [`TrustError::ConfigInvalid`] naming the first problem found.
pub fn validate_issuers(issuers: &[IssuerConfig]) -> Result<()> {
    let mut names = HashSet::new();
    let mut urls = HashSet::new();
    for i in issuers {
        i.validate()?;
        if !names.insert(i.name.as_str()) {
            return Err(TrustError::config(format!(
                "issuer name `{}` is used twice",
                i.name
            )));
        }
        if !urls.insert(i.issuer_url.as_str()) {
            return Err(TrustError::config(format!(
                "issuer `{}`: issuer_url is already used by another issuer",
                i.name
            )));
        }
    }
    Ok(())
}

/// `[a-z0-9-]{1,63}`: issuer and trust rule names.
pub(crate) fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testutil::TestKey;

    pub(crate) fn base(keys: KeySource) -> IssuerConfig {
        IssuerConfig {
            name: "ci".into(),
            issuer_url: "https://issuer.example".into(),
            keys,
            allowed_algorithms: vec![Algorithm::ES256],
            audiences: vec!["lanyard".into()],
            leeway_secs: 30,
            max_token_age_secs: None,
            replay_protection: false,
            max_token_bytes: None,
        }
    }

    #[test]
    fn algorithm_names_round_trip_and_refuse_hs_and_none() {
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>().unwrap(), a);
            assert_eq!(serde_json::to_value(a).unwrap(), json!(a.as_str()));
        }
        for bad in ["HS256", "none", "rs256", "ES512", ""] {
            assert!(bad.parse::<Algorithm>().is_err(), "{bad}");
            assert!(serde_json::from_value::<Algorithm>(json!(bad)).is_err());
        }
    }

    #[test]
    fn serde_shape_and_defaults() {
        let c: IssuerConfig = serde_json::from_value(json!({
            "name": "gh",
            "issuer_url": "https://token.actions.githubusercontent.com",
            "keys": {"type": "discovery", "url": "https://token.actions.githubusercontent.com"},
            "allowed_algorithms": ["RS256"],
            "audiences": ["lanyard"],
        }))
        .unwrap();
        assert_eq!(c.leeway_secs, 30);
        assert_eq!(c.effective_max_token_bytes(), 16384);
        assert!(!c.replay_protection);
        c.validate().unwrap();
        let err = serde_json::from_value::<IssuerConfig>(json!({
            "name": "gh", "issuer_url": "x", "keys": {"type": "jwks_url", "url": "https://x"},
            "allowed_algorithms": ["RS256"], "audiences": ["a"], "surprise": 1
        }));
        assert!(err.is_err(), "unknown fields are refused");
    }

    #[test]
    fn discovery_url_gets_suffix_once() {
        assert_eq!(
            KeySource::discovery_document_url("https://a.example/"),
            "https://a.example/.well-known/openid-configuration"
        );
        assert_eq!(
            KeySource::discovery_document_url("https://a.example/.well-known/openid-configuration"),
            "https://a.example/.well-known/openid-configuration"
        );
    }

    #[test]
    fn validate_refuses_bad_configs() {
        let url = KeySource::JwksUrl {
            url: "https://issuer.example/jwks".into(),
        };
        base(url.clone()).validate().unwrap();
        type Mutation = Box<dyn Fn(&mut IssuerConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|c| c.name = "Bad_Name".into())),
            ("name", Box::new(|c| c.name = String::new())),
            ("issuer_url", Box::new(|c| c.issuer_url = "a b".into())),
            (
                "allowed_algorithms",
                Box::new(|c| c.allowed_algorithms.clear()),
            ),
            ("audiences", Box::new(|c| c.audiences.clear())),
            ("audiences", Box::new(|c| c.audiences = vec![String::new()])),
            ("leeway_secs", Box::new(|c| c.leeway_secs = 301)),
            (
                "max_token_age_secs",
                Box::new(|c| c.max_token_age_secs = Some(0)),
            ),
            (
                "max_token_bytes",
                Box::new(|c| c.max_token_bytes = Some(10)),
            ),
            (
                "url",
                Box::new(|c| {
                    c.keys = KeySource::JwksUrl {
                        url: "ftp://x/y".into(),
                    }
                }),
            ),
            (
                "url",
                Box::new(|c| {
                    c.keys = KeySource::Discovery {
                        url: "not a url".into(),
                    }
                }),
            ),
        ];
        for (what, f) in cases {
            let mut c = base(url.clone());
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.reason(), lanyard_core::ReasonCode::ConfigInvalid);
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn inline_jwks_is_validated() {
        let k = TestKey::new(Algorithm::ES256, "k1");
        base(KeySource::InlineJwks {
            jwks: json!({"keys": [k.jwk.clone()]}),
        })
        .validate()
        .unwrap();

        let oct = json!({"keys": [k.jwk.clone(), {"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]});
        let e = base(KeySource::InlineJwks { jwks: oct })
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("oct"), "{e}");

        let e = base(KeySource::InlineJwks {
            jwks: json!({"nokeys": []}),
        })
        .validate()
        .unwrap_err();
        assert_eq!(e.reason(), lanyard_core::ReasonCode::ConfigInvalid);

        // A P-256 key cannot serve an RS256-only issuer.
        let mut c = base(KeySource::InlineJwks {
            jwks: json!({"keys": [k.jwk.clone()]}),
        });
        c.allowed_algorithms = vec![Algorithm::RS256];
        assert!(c.validate().is_err());
    }

    #[test]
    fn issuer_sets_need_unique_names_and_urls() {
        let url = KeySource::JwksUrl {
            url: "https://issuer.example/jwks".into(),
        };
        let a = base(url.clone());
        let mut b = base(url);
        b.name = "other".into();
        assert!(validate_issuers(&[a.clone(), b.clone()]).is_err());
        b.issuer_url = "https://other.example".into();
        validate_issuers(&[a.clone(), b]).unwrap();
        assert!(validate_issuers(&[a.clone(), a]).is_err());
    }
}
