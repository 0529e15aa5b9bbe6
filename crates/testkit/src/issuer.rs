//! A real OIDC issuer on 127.0.0.1: serves `/.well-known/openid-configuration` and
//! `/jwks.json` over HTTP, signs tokens with RS256, ES256 or EdDSA keys it generates,
//! rotates keys, counts fetches, and can fail or hang on demand. Tokens are assembled by
//! hand so tests can also build hostile ones.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

/// Key algorithm of a test issuer key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSA 2048, RS256.
    Rs256,
    /// P-256, ES256.
    Es256,
    /// Ed25519, EdDSA.
    EdDsa,
}

impl KeyAlg {
    /// The JOSE `alg`.
    pub fn jose(self) -> &'static str {
        match self {
            KeyAlg::Rs256 => "RS256",
            KeyAlg::Es256 => "ES256",
            KeyAlg::EdDsa => "EdDSA",
        }
    }
}

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// One signing key with its public JWK.
pub struct TestKey {
    /// Key ID.
    pub kid: String,
    /// Algorithm.
    pub alg: KeyAlg,
    signer: Signer,
    /// Public JWK.
    pub jwk: Value,
}

impl TestKey {
    /// Generate a key.
    pub fn generate(alg: KeyAlg, kid: &str) -> Self {
        let rng = SystemRandom::new();
        let (signer, jwk) = match alg {
            KeyAlg::Rs256 => {
                let kp = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
                let public = kp.public_key();
                let n = public.modulus().big_endian_without_leading_zero().to_vec();
                let e = public.exponent().big_endian_without_leading_zero().to_vec();
                let jwk = json!({"kty": "RSA", "n": B64.encode(n), "e": B64.encode(e), "kid": kid, "alg": "RS256", "use": "sig"});
                (Signer::Rsa(kp), jwk)
            }
            KeyAlg::Es256 => {
                let doc =
                    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
                let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref())
                    .unwrap();
                let p = kp.public_key().as_ref().to_vec();
                let jwk = json!({"kty": "EC", "crv": "P-256", "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65]), "kid": kid, "alg": "ES256", "use": "sig"});
                (Signer::Ec(kp), jwk)
            }
            KeyAlg::EdDsa => {
                let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let kp = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
                let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": B64.encode(kp.public_key().as_ref()), "kid": kid, "alg": "EdDSA", "use": "sig"});
                (Signer::Ed(kp), jwk)
            }
        };
        Self {
            kid: kid.to_string(),
            alg,
            signer,
            jwk,
        }
    }

    /// Sign `header` and `claims` given as raw JSON text (so tests can send duplicate
    /// keys or odd types) into a compact JWS.
    pub fn sign_raw(&self, header_json: &str, claims_json: &str) -> String {
        let input = format!("{}.{}", B64.encode(header_json), B64.encode(claims_json));
        let rng = SystemRandom::new();
        let sig = match &self.signer {
            Signer::Rsa(kp) => {
                let mut sig = vec![0; kp.public_modulus_len()];
                kp.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
                    .unwrap();
                sig
            }
            Signer::Ec(kp) => kp.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
            Signer::Ed(kp) => kp.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", B64.encode(sig))
    }

    /// Sign JSON claims with a standard header (`alg`, `kid`, `typ: JWT`).
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": self.alg.jose(), "kid": self.kid, "typ": "JWT"});
        self.sign_raw(&header.to_string(), &claims.to_string())
    }
}

/// How the issuer's endpoints behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Serve normally.
    Up = 0,
    /// Answer 503.
    Down = 1,
    /// Never answer (until the client gives up).
    Hang = 2,
}

struct Inner {
    url: String,
    keys: Mutex<Vec<Arc<TestKey>>>,
    jwks_fetches: AtomicU64,
    mode: AtomicU8,
    max_age: AtomicU64,
    oct_key: AtomicBool,
}

/// A running test issuer.
#[derive(Clone)]
pub struct TestIssuer {
    inner: Arc<Inner>,
}

impl TestIssuer {
    /// Start an issuer with one key of `alg` on 127.0.0.1.
    pub async fn start(alg: KeyAlg) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Inner {
            url,
            keys: Mutex::new(vec![Arc::new(TestKey::generate(alg, "k1"))]),
            jwks_fetches: AtomicU64::new(0),
            mode: AtomicU8::new(Mode::Up as u8),
            max_age: AtomicU64::new(300),
            oct_key: AtomicBool::new(false),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks.json", get(jwks))
            .with_state(inner.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { inner }
    }

    /// The issuer URL (`iss`).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The discovery document URL.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.inner.url)
    }

    /// The JWKS URL.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.inner.url)
    }

    /// The current signing key (the newest).
    pub fn key(&self) -> Arc<TestKey> {
        self.inner.keys.lock().unwrap().last().unwrap().clone()
    }

    /// The published JWKS document.
    pub fn jwks_document(&self) -> Value {
        jwks_doc(&self.inner)
    }

    /// Add a new key (it signs from now on; the old ones stay published).
    pub fn rotate(&self, alg: KeyAlg, kid: &str) -> Arc<TestKey> {
        let k = Arc::new(TestKey::generate(alg, kid));
        self.inner.keys.lock().unwrap().push(k.clone());
        k
    }

    /// Stop publishing every key except `kid`.
    pub fn retire_all_but(&self, kid: &str) {
        self.inner.keys.lock().unwrap().retain(|k| k.kid == kid);
    }

    /// Set how the endpoints behave.
    pub fn set_mode(&self, mode: Mode) {
        self.inner.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Set the JWKS `Cache-Control: max-age`.
    pub fn set_max_age(&self, secs: u64) {
        self.inner.max_age.store(secs, Ordering::SeqCst);
    }

    /// Also publish a symmetric `oct` key (which lanyard must refuse).
    pub fn publish_oct_key(&self, on: bool) {
        self.inner.oct_key.store(on, Ordering::SeqCst);
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.inner.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Standard claims for a token from this issuer: `iss`, `sub`, `aud`, `iat`, `nbf`,
    /// `exp` (now + 300), `jti`. `now` is the current Unix time.
    pub fn claims(&self, sub: &str, aud: &str, now: i64) -> Value {
        json!({
            "iss": self.inner.url, "sub": sub, "aud": aud,
            "iat": now, "nbf": now, "exp": now + 300,
            "jti": uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    /// Sign claims with the current key.
    pub fn mint(&self, claims: &Value) -> String {
        self.key().sign(claims)
    }
}

fn jwks_doc(inner: &Inner) -> Value {
    let mut keys: Vec<Value> = inner
        .keys
        .lock()
        .unwrap()
        .iter()
        .map(|k| k.jwk.clone())
        .collect();
    if inner.oct_key.load(Ordering::SeqCst) {
        keys.push(json!({"kty": "oct", "k": B64.encode(b"0123456789abcdef0123456789abcdef"), "kid": "oct1", "alg": "HS256"}));
    }
    json!({ "keys": keys })
}

async fn gate(inner: &Inner) -> Option<Response> {
    match inner.mode.load(Ordering::SeqCst) {
        1 => Some((StatusCode::SERVICE_UNAVAILABLE, "down").into_response()),
        2 => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Some(StatusCode::GATEWAY_TIMEOUT.into_response())
        }
        _ => None,
    }
}

async fn discovery(State(inner): State<Arc<Inner>>) -> Response {
    if let Some(r) = gate(&inner).await {
        return r;
    }
    axum::Json(json!({
        "issuer": inner.url,
        "jwks_uri": format!("{}/jwks.json", inner.url),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
    }))
    .into_response()
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Response {
    if let Some(r) = gate(&inner).await {
        return r;
    }
    inner.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let max_age = inner.max_age.load(Ordering::SeqCst);
    (
        [(header::CACHE_CONTROL, format!("max-age={max_age}"))],
        axum::Json(jwks_doc(&inner)),
    )
        .into_response()
}
