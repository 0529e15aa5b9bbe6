//! RFC 7662 token introspection for the access tokens lanyard mints (`jwt`
//! destinations): a resource server asks whether a token is still active, and a grant
//! that was released, revoked or expired answers `{"active": false}` on its next call,
//! long before the token's own `exp`.
//!
//! [`introspect`] is transport-free; `POST /oauth2/introspect` (see [`crate::http`])
//! serves it over HTTP.
//!
//! # Who may ask
//! RFC 7662 §2.1: the endpoint MUST require authorization, so it cannot be used to
//! scan for tokens. The caller authenticates with its own platform token, verified like
//! a subject token (issuer trust, trust rules, workload ID; see
//! [`Runtime::identify_client`]), never with a static secret. The token's destination
//! must list that workload ID in its `introspection_clients`; otherwise the answer is
//! `{"active": false}` as for any other token the caller may not know about (§2.2).
//!
//! # What "active" means
//! The token is a compact JWS of at most [`MAX_TOKEN_BYTES`], typed `at+jwt`, with an
//! `alg` of lanyard's signing algorithms matching the key its `kid` names among
//! lanyard's own keys (retired ones included; `jku`, `jwk`, `x5u`, `x5c` and `crit` are
//! refused, never followed), a valid signature, `iss` = lanyard's issuer URL, `exp` in
//! the future by lanyard's clock, and a `lanyard.grant_id` naming a grant that is
//! `active`, unexpired, of the token's destination and workload. Anything else is
//! `{"active": false}` and nothing more (§2.2: SHOULD NOT add more).
//!
//! ## Why no audit event
//! Introspection is the hot path of every API call a resource server makes. It changes
//! nothing, so it is counted (`lanyard_introspections_total`) and logged at debug level
//! without token contents, not written to the audit chain.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use lanyard_core::{GrantId, Secret, UnixTime};
use lanyard_keys::SigningAlgorithm;
use lanyard_store::GrantStatus;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::metrics::IntrospectionResult;
use crate::runtime::Runtime;

/// Largest token examined; a longer one is inactive without being parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The JOSE `typ` of the tokens introspection answers for (RFC 9068).
pub const TOKEN_TYP: &str = lanyard_destination_jwt::TOKEN_TYP;
/// `token_type` of an active token.
pub const TOKEN_TYPE_BEARER: &str = "Bearer";
/// How far in the future `nbf` may be, for replicas whose clocks differ slightly.
const NBF_LEEWAY_SECS: i64 = 30;
/// Header parameters that make a token inactive outright: lanyard knows its keys and
/// never takes one, or a pointer to one, from the token.
const REJECTED_HEADER_PARAMS: [&str; 5] = ["crit", "jku", "x5u", "jwk", "x5c"];

/// The answer to one introspection request (RFC 7662 §2.2). An inactive answer
/// serializes to exactly `{"active":false}`; the other fields are set only when active.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Introspection {
    /// Whether the token is active now.
    pub active: bool,
    /// Granted scopes, space-separated (absent when none were granted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The workload the token was issued to (RFC 9068 `client_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The workload ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The destination's one audience.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// lanyard's issuer URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<UnixTime>,
    /// Issue time, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<UnixTime>,
    /// Not before, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<UnixTime>,
    /// The token's ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Always [`TOKEN_TYPE_BEARER`] when active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// lanyard's grant the token belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The destination's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

impl Introspection {
    /// `{"active": false}`.
    pub fn inactive() -> Self {
        Self::default()
    }
}

/// Introspect `token` for the client that proved itself with `client_token`.
///
/// Never writes to the store; one grant read when the token verifies and the client is
/// listed for its destination.
///
/// # Errors
/// - the client token's refusal ([`Runtime::identify_client`]: `TOKEN_EXPIRED`,
///   `ISSUER_UNKNOWN`, `NO_TRUST_RULE`..., `TOKEN_MALFORMED` when empty): the caller is
///   not authenticated (HTTP 401);
/// - `STORE_UNAVAILABLE` when the grant cannot be read: lanyard cannot say the token is
///   active, and saying it is not would be a guess (HTTP 503, retry).
///
/// Everything about `token` itself is an `Ok` inactive answer, never an error.
pub async fn introspect(
    rt: &Runtime,
    client_token: &Secret,
    token: &str,
) -> Result<Introspection, ApiError> {
    let client = match rt.identify_client(client_token).await {
        Ok(w) => w,
        Err(e) => {
            rt.metrics.introspection(IntrospectionResult::Unauthorized);
            tracing::debug!(reason = %e.reason, "introspection client refused");
            return Err(e);
        }
    };
    let now = rt.clock.now_unix();
    let answer = match check(rt, client.id.as_str(), token, now).await {
        Ok(answer) => answer,
        Err(e) => {
            rt.metrics.introspection(IntrospectionResult::Error);
            tracing::debug!(client = %client.id, reason = %e.reason, "introspection failed");
            return Err(e);
        }
    };
    match answer {
        Ok(active) => {
            rt.metrics.introspection(IntrospectionResult::Active);
            tracing::debug!(
                client = %client.id,
                destination = active.destination.as_deref().unwrap_or_default(),
                "introspection: active"
            );
            Ok(active)
        }
        Err(why) => {
            rt.metrics.introspection(IntrospectionResult::Inactive);
            tracing::debug!(client = %client.id, why = why.as_str(), "introspection: inactive");
            Ok(Introspection::inactive())
        }
    }
}

/// The verdict on a token for `client`: active, or why not. `Err` only for a store
/// failure.
async fn check(
    rt: &Runtime,
    client: &str,
    token: &str,
    now: UnixTime,
) -> Result<Result<Introspection, Inactive>, ApiError> {
    let Verified { claims, grant_id } = match verify_token(
        &rt.keys.all_public_jwks(),
        rt.minter.issuer_url(),
        token,
        now,
    ) {
        Ok(v) => v,
        Err(why) => return Ok(Err(why)),
    };
    let listed = rt
        .snapshot()
        .destinations
        .get(&claims.lanyard.destination)
        .is_some_and(|d| d.spec.allows_introspection_by(client));
    if !listed {
        return Ok(Err(Inactive::ClientNotListed));
    }
    let Some(grant) = rt.store.grant_get(&grant_id).await? else {
        return Ok(Err(Inactive::GrantUnknown));
    };
    if grant.status != GrantStatus::Active {
        return Ok(Err(Inactive::GrantNotActive));
    }
    if grant.expires_at <= now {
        return Ok(Err(Inactive::GrantExpired));
    }
    if grant.destination != claims.lanyard.destination || grant.workload_id != claims.sub {
        return Ok(Err(Inactive::GrantMismatch));
    }
    // A grant issued by a replica that had not yet seen a deny entry stays active until
    // the straggler sweep revokes it; it is refused here already.
    if rt
        .grant_deny_check(&grant.workload_id, &grant.issuer, &grant.destination)
        .is_some()
    {
        return Ok(Err(Inactive::GrantNotActive));
    }
    Ok(Ok(Introspection {
        active: true,
        scope: claims.scope,
        client_id: Some(claims.client_id),
        sub: Some(claims.sub),
        aud: Some(claims.aud),
        iss: Some(claims.iss),
        exp: Some(claims.exp),
        iat: Some(claims.iat),
        nbf: Some(claims.nbf),
        jti: Some(claims.jti),
        token_type: Some(TOKEN_TYPE_BEARER.into()),
        grant_id: Some(grant_id.to_string()),
        destination: Some(claims.lanyard.destination),
    }))
}

/// Why a token is not active. Logged (at debug), never returned to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inactive {
    TooLarge,
    Malformed,
    HeaderRejected,
    WrongType,
    AlgorithmNotAllowed,
    KeyUnknown,
    SignatureInvalid,
    ClaimsInvalid,
    IssuerMismatch,
    Expired,
    NotYetValid,
    ClientNotListed,
    GrantUnknown,
    GrantNotActive,
    GrantExpired,
    GrantMismatch,
}

impl Inactive {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Inactive::TooLarge => "token too large",
            Inactive::Malformed => "not a compact jws",
            Inactive::HeaderRejected => "header carries a key or crit parameter",
            Inactive::WrongType => "typ is not at+jwt",
            Inactive::AlgorithmNotAllowed => "alg is not the algorithm of the named key",
            Inactive::KeyUnknown => "kid names no lanyard key",
            Inactive::SignatureInvalid => "signature does not verify",
            Inactive::ClaimsInvalid => "claims missing or mistyped",
            Inactive::IssuerMismatch => "iss is not lanyard's issuer url",
            Inactive::Expired => "token expired",
            Inactive::NotYetValid => "nbf in the future",
            Inactive::ClientNotListed => "client not in the destination's introspection_clients",
            Inactive::GrantUnknown => "no such grant",
            Inactive::GrantNotActive => "grant released, revoked or expired",
            Inactive::GrantExpired => "grant expired",
            Inactive::GrantMismatch => "grant is of another destination or workload",
        }
    }
}

/// The claims lanyard's `jwt` destination mints (`act`, `src` and the like are ignored).
#[derive(Debug, Deserialize)]
pub(crate) struct AccessClaims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    pub(crate) exp: UnixTime,
    pub(crate) iat: UnixTime,
    pub(crate) nbf: UnixTime,
    pub(crate) jti: String,
    #[serde(default)]
    pub(crate) scope: Option<String>,
    pub(crate) client_id: String,
    pub(crate) lanyard: LanyardClaim,
}

#[derive(Debug, Deserialize)]
pub(crate) struct LanyardClaim {
    pub(crate) grant_id: String,
    pub(crate) destination: String,
}

/// The claims of a token that verified, with its grant ID parsed.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) claims: AccessClaims,
    pub(crate) grant_id: GrantId,
}

/// Verify `token` as an access token lanyard signed with one of the keys in `jwks`
/// (`{"keys": [...]}`, lanyard's own) for `issuer_url`, unexpired at `now`. The store
/// is not consulted here.
pub(crate) fn verify_token(
    jwks: &Value,
    issuer_url: &str,
    token: &str,
    now: UnixTime,
) -> Result<Verified, Inactive> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Inactive::TooLarge);
    }
    let (h64, p64, s64) = split_compact(token).ok_or(Inactive::Malformed)?;
    let header: Map<String, Value> = URL_SAFE_NO_PAD
        .decode(h64)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(Inactive::Malformed)?;
    if REJECTED_HEADER_PARAMS
        .iter()
        .any(|p| header.contains_key(*p))
    {
        return Err(Inactive::HeaderRejected);
    }
    match header.get("typ") {
        Some(Value::String(t)) if t.eq_ignore_ascii_case(TOKEN_TYP) => {}
        _ => return Err(Inactive::WrongType),
    }
    let alg: SigningAlgorithm = match header.get("alg") {
        Some(Value::String(a)) => a.parse().map_err(|_| Inactive::AlgorithmNotAllowed)?,
        _ => return Err(Inactive::AlgorithmNotAllowed),
    };
    let Some(Value::String(kid)) = header.get("kid") else {
        return Err(Inactive::KeyUnknown);
    };
    // `kid` is only ever compared, in memory, with lanyard's own key IDs.
    let jwk = jwks
        .get("keys")
        .and_then(Value::as_array)
        .and_then(|keys| {
            keys.iter()
                .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid.as_str()))
        })
        .ok_or(Inactive::KeyUnknown)?;
    // The key decides the algorithm; the header must agree with it.
    if jwk.get("alg").and_then(Value::as_str) != Some(alg.as_str()) {
        return Err(Inactive::AlgorithmNotAllowed);
    }
    let key = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(jwk.clone())
        .ok()
        .and_then(|jwk| jsonwebtoken::DecodingKey::from_jwk(&jwk).ok())
        .ok_or(Inactive::KeyUnknown)?;
    let message = token
        .get(..h64.len() + 1 + p64.len())
        .ok_or(Inactive::Malformed)?;
    match jsonwebtoken::crypto::verify(s64, message.as_bytes(), &key, alg.jwt_algorithm()) {
        Ok(true) => {}
        Ok(false) | Err(_) => return Err(Inactive::SignatureInvalid),
    }

    // Signed by lanyard: the claims are lanyard's own, but still checked for shape.
    let claims: AccessClaims = URL_SAFE_NO_PAD
        .decode(p64)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(Inactive::ClaimsInvalid)?;
    if claims.iss != issuer_url {
        return Err(Inactive::IssuerMismatch);
    }
    if claims.exp <= now {
        return Err(Inactive::Expired);
    }
    if claims.nbf > now.saturating_add(NBF_LEEWAY_SECS) {
        return Err(Inactive::NotYetValid);
    }
    let grant_id = GrantId::parse(&claims.lanyard.grant_id).map_err(|_| Inactive::ClaimsInvalid)?;
    if claims.lanyard.destination.is_empty() {
        return Err(Inactive::ClaimsInvalid);
    }
    Ok(Verified { claims, grant_id })
}

/// The three non-empty base64url segments of a compact JWS.
fn split_compact(token: &str) -> Option<(&str, &str, &str)> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let b64url = |x: &str| {
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (b64url(h) && b64url(p) && b64url(s)).then_some((h, p, s))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use lanyard_audit::Fingerprinter;
    use lanyard_core::{Clock as _, FakeClock, ReasonCode, SharedClock};
    use lanyard_destination::Credential;
    use lanyard_keys::{KeyRing, KeyRingMinter};
    use lanyard_policy::CedarAuthorizer;
    use lanyard_store::{ConfigKind, NewAuditEvent, NewConfigObject, Store};
    use lanyard_testkit::KeyAlg;
    use lanyard_testkit::issuer::TestKey;
    use lanyard_trust::Verifier;
    use serde_json::json;

    use super::*;
    use crate::commit::Committer;
    use crate::replay::StoreReplayGuard;
    use crate::runtime::{ExchangeInput, RequestCtx};

    const NOW: i64 = 1_700_000_000;
    const OWN: &str = "https://lanyard.test";
    const UPSTREAM: &str = "https://ci.example";
    const RS: &str = "spiffe://lanyard.local/ci/orders-api";

    // === the token checks, without a runtime ===

    fn ring(dir: &Path, alg: SigningAlgorithm, clock: &FakeClock) -> KeyRing {
        KeyRing::open(&dir.join("keys"), alg, Arc::new(clock.clone())).unwrap()
    }

    fn claims() -> Value {
        json!({
            "iss": OWN, "sub": RS, "aud": "https://orders.internal",
            "iat": NOW, "nbf": NOW, "exp": NOW + 300,
            "jti": "4f3c0e0d1c5a4b7a9d3e2f1a0b9c8d7e", "scope": "read write",
            "client_id": RS,
            "lanyard": {"grant_id": "grt_0190a1b2c3d4e5f60718293a4b5c6d7e",
                        "issuer": "ci", "destination": "orders"},
        })
    }

    fn with(f: impl FnOnce(&mut Value)) -> Value {
        let mut c = claims();
        f(&mut c);
        c
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// `token` with its header replaced by `header` (the signature no longer covers it).
    fn reheader(token: &str, header: &Value) -> String {
        let (_, rest) = token.split_once('.').unwrap();
        format!("{}.{rest}", b64(header))
    }

    fn header_of(token: &str) -> Value {
        let h = token.split('.').next().unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
    }

    struct Keys {
        _dir: tempfile::TempDir,
        ring: KeyRing,
        clock: FakeClock,
    }

    fn keys(alg: SigningAlgorithm) -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::at(NOW);
        let ring = ring(dir.path(), alg, &clock);
        Keys {
            _dir: dir,
            ring,
            clock,
        }
    }

    impl Keys {
        fn sign(&self, typ: &str, claims: &Value) -> String {
            self.ring.sign(typ, claims).unwrap().into_inner()
        }
        fn check(&self, token: &str) -> Result<Verified, Inactive> {
            verify_token(
                &self.ring.all_public_jwks(),
                OWN,
                token,
                self.clock.now_unix(),
            )
        }
        fn why(&self, token: &str) -> Inactive {
            match self.check(token) {
                Ok(v) => panic!("token verified: {v:?}"),
                Err(why) => why,
            }
        }
    }

    #[test]
    fn a_token_lanyard_minted_verifies_with_either_algorithm() {
        for alg in SigningAlgorithm::ALL {
            let k = keys(*alg);
            let v = k.check(&k.sign(TOKEN_TYP, &claims())).unwrap();
            assert_eq!(v.grant_id.as_str(), "grt_0190a1b2c3d4e5f60718293a4b5c6d7e");
            assert_eq!(v.claims.lanyard.destination, "orders");
            assert_eq!(v.claims.scope.as_deref(), Some("read write"));
            // `typ` is compared case-insensitively (RFC 7515 §4.1.9).
            k.check(&k.sign("AT+JWT", &claims())).unwrap();
        }
    }

    #[test]
    fn the_type_must_be_at_jwt() {
        let k = keys(SigningAlgorithm::ES256);
        for typ in ["JWT", "jwt", "application/at+jwt", "at+jwt ", ""] {
            assert_eq!(
                k.why(&k.sign(typ, &claims())),
                Inactive::WrongType,
                "{typ:?}"
            );
        }
        let t = k.sign(TOKEN_TYP, &claims());
        let mut h = header_of(&t);
        h.as_object_mut().unwrap().remove("typ");
        assert_eq!(k.why(&reheader(&t, &h)), Inactive::WrongType);
        h["typ"] = json!(["at+jwt"]);
        assert_eq!(k.why(&reheader(&t, &h)), Inactive::WrongType);
    }

    #[test]
    fn the_algorithm_must_be_the_named_keys_own() {
        let k = keys(SigningAlgorithm::ES256);
        let t = k.sign(TOKEN_TYP, &claims());
        let h = header_of(&t);
        // Another lanyard algorithm than the key's, and algorithms lanyard never uses.
        for alg in [
            json!("EdDSA"),
            json!("none"),
            json!("HS256"),
            json!("RS256"),
            json!("ES384"),
            json!(null),
        ] {
            let mut bad = h.clone();
            bad["alg"] = alg.clone();
            assert_eq!(
                k.why(&reheader(&t, &bad)),
                Inactive::AlgorithmNotAllowed,
                "{alg}"
            );
        }
        // And the other way round: an EdDSA key named with ES256.
        let ed = keys(SigningAlgorithm::EdDSA);
        let t = ed.sign(TOKEN_TYP, &claims());
        let mut bad = header_of(&t);
        bad["alg"] = json!("ES256");
        assert_eq!(ed.why(&reheader(&t, &bad)), Inactive::AlgorithmNotAllowed);
    }

    #[test]
    fn the_key_comes_from_lanyards_ring_only() {
        let k = keys(SigningAlgorithm::ES256);
        let t = k.sign(TOKEN_TYP, &claims());
        let h = header_of(&t);
        for kid in [
            json!("nope"),
            json!(null),
            json!(7),
            json!("../../keys.json"),
        ] {
            let mut bad = h.clone();
            bad["kid"] = kid.clone();
            assert_eq!(k.why(&reheader(&t, &bad)), Inactive::KeyUnknown, "{kid}");
        }
        let mut no_kid = h.clone();
        no_kid.as_object_mut().unwrap().remove("kid");
        assert_eq!(k.why(&reheader(&t, &no_kid)), Inactive::KeyUnknown);
        // Keys offered by the token are refused, never used.
        let key_params = [
            (
                "jwk",
                json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
            ),
            ("jku", json!("https://attacker.example/jwks.json")),
            ("x5u", json!("https://attacker.example/cert.pem")),
            ("x5c", json!(["MIIB"])),
            ("crit", json!(["exp"])),
        ];
        for (param, value) in key_params {
            let mut bad = h.clone();
            bad[param] = value;
            assert_eq!(
                k.why(&reheader(&t, &bad)),
                Inactive::HeaderRejected,
                "{param}"
            );
        }
    }

    #[test]
    fn a_signature_by_anyone_else_is_refused() {
        let k = keys(SigningAlgorithm::ES256);
        let t = k.sign(TOKEN_TYP, &claims());
        let kid = header_of(&t)["kid"].as_str().unwrap().to_owned();
        // A foreign key claiming lanyard's kid.
        let foreign = TestKey::generate(KeyAlg::Es256, &kid);
        let forged = foreign.sign_raw(
            &json!({"alg": "ES256", "kid": kid, "typ": "at+jwt"}).to_string(),
            &claims().to_string(),
        );
        assert_eq!(k.why(&forged), Inactive::SignatureInvalid);
        // Another lanyard (its own keys): its kid is unknown here.
        let other = keys(SigningAlgorithm::ES256);
        assert_eq!(
            k.why(&other.sign(TOKEN_TYP, &claims())),
            Inactive::KeyUnknown
        );
        // Claims changed after signing; a signature moved to other claims.
        let (h, _, s) = {
            let mut p = t.split('.');
            (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
        };
        let widened = b64(&with(|c| c["scope"] = json!("read write admin")));
        assert_eq!(
            k.why(&format!("{h}.{widened}.{s}")),
            Inactive::SignatureInvalid
        );
        // ECDSA r = s = 0 (CVE-2022-21449).
        let zero = URL_SAFE_NO_PAD.encode([0u8; 64]);
        assert_eq!(
            k.why(&format!("{h}.{}.{zero}", t.split('.').nth(1).unwrap())),
            Inactive::SignatureInvalid
        );
    }

    #[test]
    fn keys_that_stopped_signing_still_verify_until_the_token_expires() {
        let k = keys(SigningAlgorithm::ES256);
        let old = k.sign(TOKEN_TYP, &with(|c| c["exp"] = json!(NOW + 3 * 24 * 3600)));
        k.ring.rotate(Duration::ZERO).unwrap();
        k.clock.advance(2 * 24 * 3600);
        assert!(k.ring.jwks()["keys"].as_array().unwrap().len() == 1);
        k.check(&old).unwrap();
        k.clock.advance(24 * 3600);
        assert_eq!(k.why(&old), Inactive::Expired);
    }

    #[test]
    fn issuer_and_time_are_checked() {
        let k = keys(SigningAlgorithm::ES256);
        for iss in [
            json!("https://other.example"),
            json!("https://lanyard.test/"),
            json!(null),
        ] {
            let t = k.sign(TOKEN_TYP, &with(|c| c["iss"] = iss.clone()));
            let want = if iss.is_null() {
                Inactive::ClaimsInvalid
            } else {
                Inactive::IssuerMismatch
            };
            assert_eq!(k.why(&t), want, "{iss}");
        }
        // `exp` is the first second the token is no longer active.
        assert_eq!(
            k.why(&k.sign(TOKEN_TYP, &with(|c| c["exp"] = json!(NOW)))),
            Inactive::Expired
        );
        k.check(&k.sign(TOKEN_TYP, &with(|c| c["exp"] = json!(NOW + 1))))
            .unwrap();
        let future = k.sign(TOKEN_TYP, &with(|c| c["nbf"] = json!(NOW + 3600)));
        assert_eq!(k.why(&future), Inactive::NotYetValid);
        let t = k.sign(TOKEN_TYP, &claims());
        k.clock.advance(299);
        k.check(&t).unwrap();
        k.clock.advance(1);
        assert_eq!(k.why(&t), Inactive::Expired);
    }

    #[test]
    fn claims_must_have_lanyards_shape() {
        let k = keys(SigningAlgorithm::ES256);
        let drop = |path: &[&str]| {
            with(|c| {
                let (last, parents) = path.split_last().unwrap();
                let mut obj = c;
                for p in parents {
                    obj = &mut obj[*p];
                }
                obj.as_object_mut().unwrap().remove(*last);
            })
        };
        for path in [
            &["lanyard", "grant_id"][..],
            &["lanyard", "destination"],
            &["lanyard"],
            &["sub"],
            &["exp"],
            &["jti"],
            &["client_id"],
        ] {
            assert_eq!(
                k.why(&k.sign(TOKEN_TYP, &drop(path))),
                Inactive::ClaimsInvalid,
                "{path:?}"
            );
        }
        for bad in [
            with(|c| c["lanyard"]["grant_id"] = json!("grt_' OR 1=1 --")),
            with(|c| c["lanyard"]["grant_id"] = json!(42)),
            with(|c| c["lanyard"]["destination"] = json!("")),
            with(|c| c["exp"] = json!("tomorrow")),
            with(|c| c["exp"] = json!(1.7e9)),
            with(|c| c["aud"] = json!(["https://orders.internal"])),
        ] {
            assert_eq!(
                k.why(&k.sign(TOKEN_TYP, &bad)),
                Inactive::ClaimsInvalid,
                "{bad}"
            );
        }
        // A token without scopes is fine.
        let none = drop(&["scope"]);
        assert_eq!(
            k.check(&k.sign(TOKEN_TYP, &none)).unwrap().claims.scope,
            None
        );
    }

    #[test]
    fn garbage_and_oversized_tokens_are_inactive_before_parsing() {
        let k = keys(SigningAlgorithm::ES256);
        let t = k.sign(TOKEN_TYP, &claims());
        let (h, p, s) = {
            let mut it = t.split('.');
            (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
        };
        for bad in [
            String::new(),
            "garbage".into(),
            "a.b".into(),
            "..".into(),
            format!("{h}.{p}"),
            format!("{h}.{p}.{s}.{s}"),
            format!("{h}.{p}."),
            format!("{h}.{p}.{s}="),
            format!(" {t}"),
            format!("{h}.{p}.{s}\n"),
            format!("{}.{p}.{s}", URL_SAFE_NO_PAD.encode("not json")),
            format!("{}.{p}.{s}", URL_SAFE_NO_PAD.encode("[1,2]")),
            format!("{h}.{p}.é{s}"),
            "e30.e30.e30".into(),
        ] {
            assert!(
                matches!(k.why(&bad), Inactive::Malformed | Inactive::WrongType),
                "{bad:?}: {:?}",
                k.why(&bad)
            );
        }
        let huge = with(|c| c["pad"] = json!("x".repeat(MAX_TOKEN_BYTES)));
        assert_eq!(k.why(&k.sign(TOKEN_TYP, &huge)), Inactive::TooLarge);
        assert_eq!(k.why(&"a".repeat(MAX_TOKEN_BYTES + 1)), Inactive::TooLarge);
    }

    #[test]
    fn an_inactive_answer_is_exactly_active_false() {
        assert_eq!(
            serde_json::to_string(&Introspection::inactive()).unwrap(),
            r#"{"active":false}"#
        );
    }

    // === the whole flow, on a runtime with a SQLite store ===

    const POLICY: &str = "permit (principal, action, resource);";

    struct Env {
        _dir: tempfile::TempDir,
        rt: Runtime,
        clock: FakeClock,
        upstream: TestKey,
    }

    async fn put(store: &dyn Store, kind: ConfigKind, name: &str, spec: Value) {
        store
            .config_put(
                NewConfigObject {
                    kind,
                    name: name.into(),
                    spec,
                    updated_by: "test".into(),
                    now: NOW,
                },
                None,
                NewAuditEvent {
                    kind: format!("{}.put", kind.as_str()),
                    ..NewAuditEvent::default()
                },
            )
            .await
            .unwrap();
    }

    fn destination(name: &str, clients: &[&str]) -> Value {
        json!({
            "name": name, "kind": "jwt", "default_ttl_secs": 300, "max_ttl_secs": 600,
            "scopes": ["read", "write"],
            "settings": {"audience": format!("https://{name}.internal")},
            "introspection_clients": clients,
        })
    }

    /// A runtime trusting `UPSTREAM` (inline keys, replay protection on) with a rule
    /// mapping `sub` to `spiffe://lanyard.local/ci/{sub}`, and two `jwt` destinations:
    /// `orders` (introspected by `orders-api` only) and `billing` (by any ci workload).
    async fn env() -> Env {
        lanyard_keys::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::at(NOW);
        let shared: SharedClock = Arc::new(clock.clone());
        let store: Arc<dyn Store> = Arc::new(
            lanyard_store_sqlite::SqliteStore::open(&dir.path().join("lanyard.db"))
                .await
                .unwrap(),
        );
        let upstream = TestKey::generate(KeyAlg::Es256, "up-1");
        put(
            store.as_ref(),
            ConfigKind::Issuer,
            "ci",
            json!({
                "name": "ci", "issuer_url": UPSTREAM,
                "keys": {"type": "inline_jwks", "jwks": {"keys": [upstream.jwk.clone()]}},
                "allowed_algorithms": ["ES256"], "audiences": ["lanyard"],
                "leeway_secs": 5, "max_token_age_secs": 600, "replay_protection": true,
                "max_token_bytes": null,
            }),
        )
        .await;
        put(
            store.as_ref(),
            ConfigKind::TrustRule,
            "ci",
            json!({
                "name": "ci", "issuer": "ci", "priority": 10, "conditions": [],
                "workload_template": "spiffe://{trust_domain}/ci/{sub}",
            }),
        )
        .await;
        put(
            store.as_ref(),
            ConfigKind::Destination,
            "orders",
            destination("orders", &[RS]),
        )
        .await;
        put(
            store.as_ref(),
            ConfigKind::Destination,
            "billing",
            destination("billing", &["spiffe://lanyard.local/ci/*"]),
        )
        .await;
        let verifier = Verifier::new(
            lanyard_trust::VerifierSettings::new(OWN),
            shared.clone(),
            Arc::new(StoreReplayGuard::new(store.clone(), shared.clone())),
        )
        .unwrap();
        let keys = Arc::new(ring(dir.path(), SigningAlgorithm::ES256, &clock));
        let rt = Runtime::new(
            store.clone(),
            verifier,
            Arc::new(CedarAuthorizer::from_text(POLICY, "test-1").unwrap()),
            keys.clone(),
            Arc::new(KeyRingMinter::new(keys, OWN)),
            shared,
            Committer::start(store, 16),
            "lanyard.local".into(),
            Arc::new(Fingerprinter::open_or_create(&dir.path().join("hmac.key")).unwrap()),
            Arc::new(lanyard_keys::SealKey::from_bytes(&[1; 32]).unwrap()),
        );
        rt.reload(true).await.unwrap();
        Env {
            _dir: dir,
            rt,
            clock,
            upstream,
        }
    }

    impl Env {
        /// A platform token of workload `spiffe://lanyard.local/ci/{sub}`.
        fn platform_token(&self, sub: &str) -> Secret {
            let now = self.clock.now_unix();
            Secret::new(self.upstream.sign(&json!({
                "iss": UPSTREAM, "sub": sub, "aud": "lanyard",
                "iat": now, "nbf": now, "exp": now + 300,
                "jti": uuid::Uuid::new_v4().simple().to_string(),
            })))
        }

        /// Exchange as `sub` for `destination`; the access token and the grant ID.
        async fn exchange(&self, sub: &str, destination: &str) -> (String, String) {
            let out = self
                .rt
                .exchange(
                    ExchangeInput {
                        subject_token: self.platform_token(sub),
                        subject_token_type: String::new(),
                        actor_token: None,
                        actor_token_type: String::new(),
                        destination: destination.into(),
                        scopes: vec!["read".into()],
                        ttl_secs: 120,
                        audience: String::new(),
                    },
                    &RequestCtx::default(),
                )
                .await
                .unwrap();
            let Credential::Bearer { token, .. } = out.issued.credential else {
                panic!("a jwt destination issues bearer tokens");
            };
            (token.into_inner(), out.grant.id.to_string())
        }

        async fn ask(&self, client: &Secret, token: &str) -> Introspection {
            introspect(&self.rt, client, token).await.unwrap()
        }

        fn counted(&self, result: &str) -> f64 {
            let text = self.rt.metrics.render();
            let prefix = format!("lanyard_introspections_total{{result=\"{result}\"}}");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
                .unwrap_or(0.0)
        }
    }

    #[tokio::test]
    async fn a_listed_client_sees_the_claims_until_the_grant_is_released() {
        let env = env().await;
        let (token, grant_id) = env.exchange("builder", "orders").await;
        let rs = env.platform_token("orders-api");
        let answer = env.ask(&rs, &token).await;
        assert_eq!(
            answer,
            Introspection {
                active: true,
                scope: Some("read".into()),
                client_id: Some("spiffe://lanyard.local/ci/builder".into()),
                sub: Some("spiffe://lanyard.local/ci/builder".into()),
                aud: Some("https://orders.internal".into()),
                iss: Some(OWN.into()),
                exp: Some(NOW + 120),
                iat: Some(NOW),
                nbf: Some(NOW),
                jti: answer.jti.clone(),
                token_type: Some("Bearer".into()),
                grant_id: Some(grant_id.clone()),
                destination: Some("orders".into()),
            }
        );
        assert_eq!(answer.jti.as_deref().map(str::len), Some(32));
        // The same client token, again and again, though its issuer has replay
        // protection: client authentication does not consume it.
        for _ in 0..3 {
            assert!(env.ask(&rs, &token).await.active);
        }
        // Released: inactive at once, long before the token's exp.
        env.rt
            .release(
                &grant_id,
                &env.platform_token("builder"),
                "",
                &RequestCtx::default(),
            )
            .await
            .unwrap();
        let answer = env.ask(&rs, &token).await;
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"active":false}"#
        );
        assert_eq!(env.counted("active"), 4.0);
        assert_eq!(env.counted("inactive"), 1.0);
    }

    #[tokio::test]
    async fn revoked_and_expired_grants_are_inactive() {
        let env = env().await;
        let rs = env.platform_token("orders-api");
        let (token, grant_id) = env.exchange("builder", "orders").await;
        assert!(env.ask(&rs, &token).await.active);
        env.rt
            .store
            .grant_finish(
                &GrantId::parse(&grant_id).unwrap(),
                GrantStatus::Revoked,
                NOW,
                NewAuditEvent {
                    kind: "grant.revoked".into(),
                    ..NewAuditEvent::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(env.ask(&rs, &token).await, Introspection::inactive());

        let (token, _) = env.exchange("builder", "orders").await;
        env.clock.advance(119);
        let rs = env.platform_token("orders-api");
        assert!(env.ask(&rs, &token).await.active);
        env.clock.advance(1);
        assert_eq!(env.ask(&rs, &token).await, Introspection::inactive());
    }

    #[tokio::test]
    async fn only_listed_clients_learn_anything() {
        let env = env().await;
        let (orders, _) = env.exchange("builder", "orders").await;
        let (billing, _) = env.exchange("builder", "billing").await;
        let rs = env.platform_token("orders-api");
        let other = env.platform_token("billing-api");
        // `orders` lists orders-api only; `billing` lists every ci workload.
        assert!(env.ask(&rs, &orders).await.active);
        assert_eq!(env.ask(&other, &orders).await, Introspection::inactive());
        assert!(env.ask(&other, &billing).await.active);
        assert!(env.ask(&rs, &billing).await.active);
        // The workload holding the token is not a listed client of `orders` either.
        let holder = env.platform_token("builder");
        assert_eq!(env.ask(&holder, &orders).await, Introspection::inactive());
    }

    #[tokio::test]
    async fn a_token_must_match_its_grants_destination_and_workload() {
        let env = env().await;
        let (token, grant_id) = env.exchange("builder", "orders").await;
        let rs = env.platform_token("orders-api");
        let claims: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        let resign = |f: &dyn Fn(&mut Value)| {
            let mut c = claims.clone();
            f(&mut c);
            env.rt.keys.sign(TOKEN_TYP, &c).unwrap().into_inner()
        };
        // Signed by lanyard, but naming another destination or workload than the grant.
        let other_dest = resign(&|c| c["lanyard"]["destination"] = json!("billing"));
        let other_sub = resign(&|c| c["sub"] = json!("spiffe://lanyard.local/ci/intruder"));
        let unknown = resign(&|c| {
            c["lanyard"]["grant_id"] = json!("grt_00000000000000000000000000000000");
        });
        let other_client = env.platform_token("billing-api");
        assert_eq!(
            env.ask(&other_client, &other_dest).await,
            Introspection::inactive()
        );
        assert_eq!(env.ask(&rs, &other_sub).await, Introspection::inactive());
        assert_eq!(env.ask(&rs, &unknown).await, Introspection::inactive());
        assert!(env.ask(&rs, &resign(&|_| {})).await.active);
        assert_eq!(
            env.ask(
                &rs,
                &resign(&|c| c["lanyard"]["grant_id"] = json!(grant_id.to_uppercase()))
            )
            .await,
            Introspection::inactive()
        );
        // A destination that was deleted lists nobody.
        env.rt
            .store
            .config_delete(ConfigKind::Destination, "orders", NewAuditEvent::default())
            .await
            .unwrap();
        env.rt.reload(true).await.unwrap();
        assert_eq!(env.ask(&rs, &token).await, Introspection::inactive());
    }

    #[tokio::test]
    async fn a_client_that_cannot_prove_itself_is_refused_not_answered() {
        let env = env().await;
        let (token, _) = env.exchange("builder", "orders").await;
        let err = introspect(&env.rt, &Secret::new(""), &token)
            .await
            .unwrap_err();
        assert_eq!(err.reason, ReasonCode::TokenMalformed);
        let err = introspect(&env.rt, &Secret::new("not-a-jwt"), &token)
            .await
            .unwrap_err();
        assert_eq!(err.reason, ReasonCode::TokenMalformed);
        // lanyard's own token is not a client credential.
        let err = introspect(&env.rt, &Secret::new(token.clone()), &token)
            .await
            .unwrap_err();
        assert_eq!(err.reason, ReasonCode::TokenTypeRejected);
        let rs = env.platform_token("orders-api");
        // Past its exp and the issuer's 5 s leeway.
        env.clock.advance(306);
        let err = introspect(&env.rt, &rs, &token).await.unwrap_err();
        assert_eq!(err.reason, ReasonCode::TokenExpired);
        assert_eq!(env.counted("unauthorized"), 4.0);
        assert_eq!(env.counted("active") + env.counted("inactive"), 0.0);
    }
}
