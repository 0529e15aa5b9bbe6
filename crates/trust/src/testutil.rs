//! Test helpers: runtime-generated keys, hand-built tokens, and a local OIDC issuer
//! (discovery + JWKS) on 127.0.0.1 with knobs for failures, delays and cache headers.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair,
};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::EncodingKey;
use serde_json::{Value, json};

use crate::config::Algorithm;

pub(crate) fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key generated at run time, with its public JWK.
pub(crate) struct TestKey {
    pub(crate) alg: Algorithm,
    pub(crate) kid: String,
    enc: EncodingKey,
    pub(crate) jwk: Value,
    /// The public key in SubjectPublicKeyInfo DER (for key-confusion tests).
    pub(crate) public_der: Vec<u8>,
}

/// Read one DER TLV: (tag, contents, rest).
fn der_read(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let first = input[1] as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    (tag, &input[header..header + len], &input[header + len..])
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo`.
fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Vec<u8> {
    let (_, seq, _) = der_read(pkcs8);
    let (_, _version, rest) = der_read(seq);
    let (_, _alg, rest) = der_read(rest);
    let (tag, key, _) = der_read(rest);
    assert_eq!(tag, 0x04, "expected OCTET STRING");
    key.to_vec()
}

impl TestKey {
    pub(crate) fn new(alg: Algorithm, kid: &str) -> Self {
        let rng = SystemRandom::new();
        let (enc, jwk, public_der) = match alg {
            Algorithm::RS256 | Algorithm::PS256 => {
                let kp = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
                let pkcs8 = kp.as_der().unwrap();
                let pkcs1 = pkcs8_to_pkcs1(pkcs8.as_ref());
                let comps = PublicKeyComponents::<Vec<u8>>::from(kp.public_key());
                let der = kp.public_key().as_der().unwrap().as_ref().to_vec();
                (
                    EncodingKey::from_rsa_der(&pkcs1),
                    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&comps.n), "e": b64(&comps.e)}),
                    der,
                )
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let (sig_alg, crv, len) = if alg == Algorithm::ES256 {
                    (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
                } else {
                    (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
                };
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(sig_alg, &rng).unwrap();
                let kp = EcdsaKeyPair::from_pkcs8(sig_alg, pkcs8.as_ref()).unwrap();
                let point = kp.public_key().as_ref().to_vec();
                let (x, y) = point[1..].split_at(len);
                (
                    EncodingKey::from_ec_der(pkcs8.as_ref()),
                    json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64(x), "y": b64(y)}),
                    point.clone(),
                )
            }
            Algorithm::EdDSA => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
                let x = kp.public_key().as_ref().to_vec();
                (
                    EncodingKey::from_ed_der(pkcs8.as_ref()),
                    json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(&x), "alg": "EdDSA"}),
                    x,
                )
            }
        };
        Self {
            alg,
            kid: kid.to_owned(),
            enc,
            jwk,
            public_der,
        }
    }

    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.enc
    }

    /// The default header: `alg`, `typ: JWT` and `kid`.
    pub(crate) fn header(&self) -> Value {
        json!({"alg": self.alg.as_str(), "typ": "JWT", "kid": self.kid})
    }

    /// Sign exact header and payload JSON text with this key's algorithm.
    pub(crate) fn sign_text(&self, header: &str, payload: &str) -> String {
        sign_text_with(&self.enc, self.alg.to_jwt(), header, payload)
    }

    pub(crate) fn sign(&self, header: &Value, claims: &Value) -> String {
        self.sign_text(&header.to_string(), &claims.to_string())
    }

    /// A token with the default header.
    pub(crate) fn token(&self, claims: &Value) -> String {
        self.sign(&self.header(), claims)
    }
}

/// Sign with any key and algorithm, including ones lanyard refuses.
pub(crate) fn sign_text_with(
    key: &EncodingKey,
    alg: jsonwebtoken::Algorithm,
    header: &str,
    payload: &str,
) -> String {
    let msg = format!("{}.{}", b64(header), b64(payload));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).unwrap();
    format!("{msg}.{sig}")
}

/// Knobs and counters of a [`TestIssuer`].
pub(crate) struct IssuerKnobs {
    pub(crate) base: String,
    pub(crate) jwks: Mutex<Value>,
    /// The `issuer` the discovery document claims.
    pub(crate) discovery_issuer: Mutex<String>,
    pub(crate) cache_control: Mutex<Option<String>>,
    pub(crate) fail: AtomicBool,
    pub(crate) delay_ms: AtomicU64,
    /// Serve a JWKS body of this many bytes instead of the real one.
    pub(crate) oversize: Mutex<Option<usize>>,
    pub(crate) jwks_hits: AtomicUsize,
    pub(crate) discovery_hits: AtomicUsize,
}

impl IssuerKnobs {
    pub(crate) fn set_keys(&self, keys: &[&TestKey]) {
        *self.jwks.lock().unwrap() =
            json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    }
    pub(crate) fn jwks_hits(&self) -> usize {
        self.jwks_hits.load(Ordering::SeqCst)
    }
}

/// A local OIDC issuer on 127.0.0.1: `/.well-known/openid-configuration` and `/jwks`.
pub(crate) struct TestIssuer {
    pub(crate) knobs: Arc<IssuerKnobs>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestIssuer {
    pub(crate) async fn start(keys: &[&TestKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let knobs = Arc::new(IssuerKnobs {
            base: base.clone(),
            jwks: Mutex::new(json!({"keys": []})),
            discovery_issuer: Mutex::new(base),
            cache_control: Mutex::new(None),
            fail: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            oversize: Mutex::new(None),
            jwks_hits: AtomicUsize::new(0),
            discovery_hits: AtomicUsize::new(0),
        });
        knobs.set_keys(keys);
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(Arc::clone(&knobs));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { knobs, task }
    }

    pub(crate) fn base(&self) -> &str {
        &self.knobs.base
    }

    pub(crate) fn jwks_url(&self) -> String {
        format!("{}/jwks", self.knobs.base)
    }
}

async fn pause_or_fail(k: &IssuerKnobs) -> Option<Response> {
    let delay = k.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if k.fail.load(Ordering::SeqCst) {
        return Some(
            Response::builder()
                .status(503)
                .body(Body::from("down"))
                .unwrap(),
        );
    }
    None
}

async fn discovery(State(k): State<Arc<IssuerKnobs>>) -> Response {
    k.discovery_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = pause_or_fail(&k).await {
        return r;
    }
    let doc = json!({
        "issuer": *k.discovery_issuer.lock().unwrap(),
        "jwks_uri": format!("{}/jwks", k.base),
        "id_token_signing_alg_values_supported": ["RS256"],
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(doc.to_string()))
        .unwrap()
}

async fn jwks(State(k): State<Arc<IssuerKnobs>>) -> Response {
    k.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = pause_or_fail(&k).await {
        return r;
    }
    let body = match *k.oversize.lock().unwrap() {
        Some(n) => format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(n)),
        None => k.jwks.lock().unwrap().to_string(),
    };
    let mut b = Response::builder().header("content-type", "application/json");
    if let Some(cc) = k.cache_control.lock().unwrap().clone() {
        b = b.header("cache-control", cc);
    }
    b.body(Body::from(body)).unwrap()
}
