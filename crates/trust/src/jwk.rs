//! Turning JWKS documents into keys lanyard will verify with.
//!
//! ## Why we parse JWKs ourselves
//! `jsonwebtoken::DecodingKey::from_jwk` turns a `kty: "oct"` key into an HMAC key and
//! ignores the JWK's `alg`, `use` and the RSA modulus size. Each key here records its
//! kind (RSA with its size, P-256, P-384, Ed25519) and optional `alg`, so the verifier
//! pins the algorithm to the key type and never to the token header alone.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::sync::Arc;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ParsedPublicKey};
use jsonwebtoken::DecodingKey;
use serde_json::Value;

use crate::config::Algorithm;

/// Smallest RSA modulus accepted.
pub(crate) const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted (the verifier's own upper bound).
pub(crate) const MAX_RSA_BITS: usize = 8192;
/// Most keys kept from one JWKS document.
pub(crate) const MAX_KEYS: usize = 100;

/// The type of a verification key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa { bits: usize },
    P256,
    P384,
    Ed25519,
}

/// A public key ready for signature verification.
#[derive(Clone)]
pub(crate) struct VerifyingKey {
    pub(crate) kid: Option<String>,
    pub(crate) kind: KeyKind,
    /// The JWK's own `alg`, if it had one.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
    /// EC keys, parsed once for the algorithm their curve fits. Parsing a P-256 point
    /// costs about 2.5 µs, which `jsonwebtoken::crypto::verify` pays on every token.
    /// `None` for other key types (and for a point aws-lc refuses, which then fails
    /// verification through `key` as before).
    pub(crate) ec: Option<(Algorithm, Arc<ParsedPublicKey>)>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// Whether this key may verify `alg`: the key type fits and the JWK's `alg`, if any,
    /// is exactly `alg`.
    pub(crate) fn supports(&self, alg: Algorithm) -> bool {
        kind_fits(self.kind, alg) && self.alg.is_none_or(|a| a == alg)
    }
}

fn kind_fits(kind: KeyKind, alg: Algorithm) -> bool {
    match alg {
        Algorithm::RS256 | Algorithm::PS256 => {
            matches!(kind, KeyKind::Rsa { bits } if bits >= MIN_RSA_BITS)
        }
        Algorithm::ES256 => kind == KeyKind::P256,
        Algorithm::ES384 => kind == KeyKind::P384,
        Algorithm::EdDSA => kind == KeyKind::Ed25519,
    }
}

/// Why one JWK was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwkRejection {
    /// A symmetric key: never accepted.
    Symmetric,
    /// `use` is not `sig`, or `key_ops` lacks `verify`.
    NotForSignatures,
    /// A key type, curve or algorithm lanyard does not verify with.
    Unsupported(&'static str),
    /// Malformed parameters.
    Invalid(&'static str),
}

impl JwkRejection {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            JwkRejection::Symmetric => "symmetric (oct) keys are refused",
            JwkRejection::NotForSignatures => "key is not for signatures",
            JwkRejection::Unsupported(w) | JwkRejection::Invalid(w) => w,
        }
    }
}

/// A parsed JWKS: the keys kept and, per refused key, its `kid` and why.
pub(crate) struct ParsedJwks {
    pub(crate) keys: Vec<VerifyingKey>,
    pub(crate) rejected: Vec<(Option<String>, JwkRejection)>,
}

/// Parse a JWKS document (`{"keys": [...]}`) leniently: unusable keys are set aside,
/// not fatal, because a remote set may hold encryption keys or keys for other verifiers.
///
/// # Errors
/// A static description when the document is not a JWKS at all.
pub(crate) fn parse_jwks(doc: &Value) -> Result<ParsedJwks, &'static str> {
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("jwks document has no `keys` array")?;
    let mut out = ParsedJwks {
        keys: Vec::new(),
        rejected: Vec::new(),
    };
    for k in keys {
        match parse_jwk(k) {
            Ok(key) if out.keys.len() < MAX_KEYS => out.keys.push(key),
            Ok(key) => out
                .rejected
                .push((key.kid, JwkRejection::Invalid("too many keys in jwks"))),
            Err(why) => out
                .rejected
                .push((k.get("kid").and_then(Value::as_str).map(str::to_owned), why)),
        }
    }
    Ok(out)
}

/// Parse an inline JWKS strictly: every key must be usable.
///
/// # Errors
/// A description of the first problem.
pub(crate) fn parse_inline_jwks(doc: &Value) -> Result<Vec<VerifyingKey>, String> {
    let parsed = parse_jwks(doc).map_err(|e| format!("inline jwks: {e}"))?;
    if let Some((_, why)) = parsed.rejected.first() {
        return Err(format!("inline jwks: {}", why.describe()));
    }
    if parsed.keys.is_empty() {
        return Err("inline jwks has no keys".to_owned());
    }
    Ok(parsed.keys)
}

fn str_param<'a>(k: &'a Value, name: &str) -> Result<Option<&'a str>, JwkRejection> {
    match k.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(JwkRejection::Invalid("jwk parameter has the wrong type")),
    }
}

fn b64_param(k: &Value, name: &str) -> Result<Vec<u8>, JwkRejection> {
    let s = str_param(k, name)?.ok_or(JwkRejection::Invalid("jwk is missing a key parameter"))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwkRejection::Invalid("jwk key parameter is not base64url"))
}

/// Parse one JWK.
pub(crate) fn parse_jwk(k: &Value) -> Result<VerifyingKey, JwkRejection> {
    if !k.is_object() {
        return Err(JwkRejection::Invalid("jwk is not an object"));
    }
    let kty = str_param(k, "kty")?.ok_or(JwkRejection::Invalid("jwk has no kty"))?;
    if kty == "oct" {
        return Err(JwkRejection::Symmetric);
    }
    if let Some(u) = str_param(k, "use")?
        && u != "sig"
    {
        return Err(JwkRejection::NotForSignatures);
    }
    if let Some(ops) = k.get("key_ops") {
        let ops = ops
            .as_array()
            .ok_or(JwkRejection::Invalid("jwk key_ops is not an array"))?;
        if !ops.iter().any(|o| o.as_str() == Some("verify")) {
            return Err(JwkRejection::NotForSignatures);
        }
    }
    let kid = str_param(k, "kid")?.map(str::to_owned);
    let alg = match str_param(k, "alg")? {
        None => None,
        Some(a) => Some(
            a.parse::<Algorithm>()
                .map_err(|_| JwkRejection::Unsupported("jwk alg is not supported"))?,
        ),
    };
    let mut ec = None;
    let (kind, key) = match kty {
        "RSA" => {
            let n = b64_param(k, "n")?;
            let e = b64_param(k, "e")?;
            let n_trim = strip_leading_zeros(&n);
            let e_trim = strip_leading_zeros(&e);
            let bits = bit_len(n_trim);
            if bits < MIN_RSA_BITS {
                return Err(JwkRejection::Invalid(
                    "rsa modulus is shorter than 2048 bits",
                ));
            }
            if bits > MAX_RSA_BITS {
                return Err(JwkRejection::Invalid(
                    "rsa modulus is longer than 8192 bits",
                ));
            }
            if e_trim.is_empty() || e_trim.len() > 8 || e_trim.last().is_some_and(|b| b & 1 == 0) {
                return Err(JwkRejection::Invalid("rsa exponent is invalid"));
            }
            (
                KeyKind::Rsa { bits },
                DecodingKey::from_rsa_raw_components(n_trim, e_trim),
            )
        }
        "EC" => {
            let crv = str_param(k, "crv")?.ok_or(JwkRejection::Invalid("ec jwk has no crv"))?;
            let (kind, len) = match crv {
                "P-256" => (KeyKind::P256, 32),
                "P-384" => (KeyKind::P384, 48),
                _ => return Err(JwkRejection::Unsupported("ec curve is not supported")),
            };
            let x = b64_param(k, "x")?;
            let y = b64_param(k, "y")?;
            if x.len() != len || y.len() != len {
                return Err(JwkRejection::Invalid(
                    "ec coordinates have the wrong length",
                ));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let (alg, verify) = match kind {
                KeyKind::P384 => (Algorithm::ES384, &ECDSA_P384_SHA384_FIXED),
                _ => (Algorithm::ES256, &ECDSA_P256_SHA256_FIXED),
            };
            ec = ParsedPublicKey::new(verify, &point)
                .ok()
                .map(|k| (alg, Arc::new(k)));
            (kind, DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            let crv = str_param(k, "crv")?.ok_or(JwkRejection::Invalid("okp jwk has no crv"))?;
            if crv != "Ed25519" {
                return Err(JwkRejection::Unsupported("okp curve is not supported"));
            }
            let x = b64_param(k, "x")?;
            if x.len() != 32 {
                return Err(JwkRejection::Invalid("ed25519 key has the wrong length"));
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        _ => return Err(JwkRejection::Unsupported("jwk kty is not supported")),
    };
    if let Some(a) = alg
        && !kind_fits(kind, a)
    {
        return Err(JwkRejection::Invalid("jwk alg does not fit its key type"));
    }
    Ok(VerifyingKey {
        kid,
        kind,
        alg,
        key,
        ec,
    })
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b.get(first..).unwrap_or_default()
}

fn bit_len(b: &[u8]) -> usize {
    match b.first() {
        None => 0,
        Some(&top) => (b.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testutil::TestKey;

    #[test]
    fn parses_each_key_type() {
        for (alg, kind) in [
            (Algorithm::RS256, KeyKind::Rsa { bits: 2048 }),
            (Algorithm::ES256, KeyKind::P256),
            (Algorithm::ES384, KeyKind::P384),
            (Algorithm::EdDSA, KeyKind::Ed25519),
        ] {
            let k = parse_jwk(&TestKey::new(alg, "a").jwk).unwrap();
            assert_eq!(k.kind, kind);
            assert!(k.supports(alg));
            assert_eq!(k.kid.as_deref(), Some("a"));
        }
    }

    #[test]
    fn key_type_pins_algorithm() {
        let rsa = parse_jwk(&TestKey::new(Algorithm::RS256, "r").jwk).unwrap();
        assert!(rsa.supports(Algorithm::RS256));
        assert!(rsa.supports(Algorithm::PS256));
        assert!(!rsa.supports(Algorithm::ES256));
        let mut with_alg = TestKey::new(Algorithm::RS256, "r").jwk;
        with_alg["alg"] = json!("PS256");
        let ps = parse_jwk(&with_alg).unwrap();
        assert!(ps.supports(Algorithm::PS256));
        assert!(
            !ps.supports(Algorithm::RS256),
            "jwk alg must equal the header alg"
        );
        let p256 = parse_jwk(&TestKey::new(Algorithm::ES256, "e").jwk).unwrap();
        assert!(!p256.supports(Algorithm::ES384));
    }

    #[test]
    fn refuses_oct_enc_weak_and_odd_keys() {
        assert_eq!(
            parse_jwk(&json!({"kty": "oct", "k": "c2VjcmV0"})).unwrap_err(),
            JwkRejection::Symmetric
        );
        let mut enc = TestKey::new(Algorithm::ES256, "e").jwk;
        enc["use"] = json!("enc");
        assert_eq!(parse_jwk(&enc).unwrap_err(), JwkRejection::NotForSignatures);
        let mut ops = TestKey::new(Algorithm::ES256, "e").jwk;
        ops["key_ops"] = json!(["encrypt"]);
        assert_eq!(parse_jwk(&ops).unwrap_err(), JwkRejection::NotForSignatures);
        let small = json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB"});
        assert!(matches!(parse_jwk(&small), Err(JwkRejection::Invalid(_))));
        let mut hs = TestKey::new(Algorithm::ES256, "e").jwk;
        hs["alg"] = json!("HS256");
        assert!(matches!(parse_jwk(&hs), Err(JwkRejection::Unsupported(_))));
        let mut mismatched = TestKey::new(Algorithm::ES256, "e").jwk;
        mismatched["alg"] = json!("RS256");
        assert!(matches!(
            parse_jwk(&mismatched),
            Err(JwkRejection::Invalid(_))
        ));
        let mut short = TestKey::new(Algorithm::ES256, "e").jwk;
        short["x"] = json!("AAAA");
        assert!(matches!(parse_jwk(&short), Err(JwkRejection::Invalid(_))));
        assert!(matches!(
            parse_jwk(&json!({"kty": "OKP", "crv": "Ed448", "x": "AA"})),
            Err(JwkRejection::Unsupported(_))
        ));
    }

    #[test]
    fn jwks_sets_keep_good_keys_and_report_the_rest() {
        let good = TestKey::new(Algorithm::ES256, "good").jwk;
        let parsed =
            parse_jwks(&json!({"keys": [good, {"kty": "oct", "k": "AA", "kid": "h"}]})).unwrap();
        assert_eq!(parsed.keys.len(), 1);
        assert_eq!(
            parsed.rejected,
            vec![(Some("h".to_owned()), JwkRejection::Symmetric)]
        );
        assert!(parse_jwks(&json!({"keys": {}})).is_err());
        assert!(parse_jwks(&json!([])).is_err());
    }

    #[test]
    fn bit_lengths() {
        assert_eq!(bit_len(&[]), 0);
        assert_eq!(bit_len(&[1]), 1);
        assert_eq!(bit_len(&[0x80, 0]), 16);
        assert_eq!(strip_leading_zeros(&[0, 0, 5]), &[5]);
    }
}
