//! `--dev` mode: a built-in development issuer (served over lanyard's own HTTP port, so
//! the real discovery + JWKS path is used), a dev trust rule, a `jwt` destination and a
//! policy that allows dev workloads. `lanyard dev token` mints tokens from it.
//!
//! The dev issuer's private key lives in `<data_dir>/dev-issuer/` with owner-only
//! permissions. Never use `--dev` for anything but trying lanyard out.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Audience dev tokens carry and the dev issuer accepts.
pub const DEV_AUDIENCE: &str = "lanyard";
/// Name of the dev issuer, trust rule and destination.
pub const DEV_ISSUER_NAME: &str = "dev";
/// The dev destination.
pub const DEV_DESTINATION: &str = "dev-api";

/// Errors of the dev issuer.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Reading or writing the key failed.
    #[error("dev issuer key at {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key could not be generated or used.
    #[error("dev issuer key: {0}")]
    Key(String),
}

#[derive(Serialize, Deserialize)]
struct DevMeta {
    issuer_url: String,
    kid: String,
}

/// The development issuer.
pub struct DevIssuer {
    issuer_url: String,
    kid: String,
    jwk: serde_json::Value,
}

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("dev-issuer")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

impl DevIssuer {
    /// Create (or reuse) the dev issuer key under `data_dir`, for `issuer_url`.
    ///
    /// # Errors
    /// [`DevError`] when the key cannot be created or read.
    pub fn open(data_dir: &Path, issuer_url: &str) -> Result<Self, DevError> {
        let d = dir(data_dir);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(io(&d))?;
        let key_path = d.join("key.p8");
        let der = match std::fs::read(&key_path) {
            Ok(b) => b,
            Err(_) => {
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|e| DevError::Key(e.to_string()))?;
                write_private(&key_path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
        };
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            .map_err(|e| DevError::Key(e.to_string()))?;
        let public = pair.public_key().as_ref();
        if public.len() != 65 {
            return Err(DevError::Key("unexpected public key encoding".into()));
        }
        let x = URL_SAFE_NO_PAD.encode(&public[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&public[33..65]);
        let kid = format!("dev-{}", &URL_SAFE_NO_PAD.encode(&public[1..13]));
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"});
        let meta = DevMeta {
            issuer_url: issuer_url.to_string(),
            kid: kid.clone(),
        };
        let meta_path = d.join("issuer.json");
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| DevError::Key(e.to_string()))?;
        write_private(&meta_path, &text)?;
        Ok(Self {
            issuer_url: issuer_url.to_string(),
            kid,
            jwk,
        })
    }

    /// The dev issuer URL.
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    /// Its OIDC discovery document.
    pub fn discovery(&self) -> serde_json::Value {
        json!({
            "issuer": self.issuer_url,
            "jwks_uri": format!("{}/jwks.json", self.issuer_url),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// Its JWKS.
    pub fn jwks(&self) -> serde_json::Value {
        json!({ "keys": [self.jwk] })
    }

    /// Its key ID.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// Mint a dev workload token from the dev issuer key under `data_dir`.
///
/// # Errors
/// [`DevError`] when no dev issuer exists there (start `lanyard serve --dev` first).
pub fn mint_dev_token(
    data_dir: &Path,
    subject: &str,
    task: Option<&str>,
    ttl_secs: i64,
    now: i64,
) -> Result<String, DevError> {
    let d = dir(data_dir);
    let meta_path = d.join("issuer.json");
    let meta: DevMeta = serde_json::from_slice(&std::fs::read(&meta_path).map_err(io(&meta_path))?)
        .map_err(|e| DevError::Key(format!("{}: {e}", meta_path.display())))?;
    let key_path = d.join("key.p8");
    let der = std::fs::read(&key_path).map_err(io(&key_path))?;
    let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(meta.kid);
    header.typ = Some("JWT".into());
    let mut claims = json!({
        "iss": meta.issuer_url,
        "sub": subject,
        "aud": DEV_AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_secs,
        "jti": uuid::Uuid::new_v4().simple().to_string(),
    });
    if let Some(t) = task {
        claims["task"] = json!(t);
    }
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&der))
        .map_err(|e| DevError::Key(e.to_string()))
}

/// The dev configuration objects: (issuer, trust rule, destination) specs as JSON.
pub fn dev_objects(dev: &DevIssuer) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let issuer = json!({
        "name": DEV_ISSUER_NAME,
        "issuer_url": dev.issuer_url(),
        "keys": {"type": "discovery", "url": format!("{}/.well-known/openid-configuration", dev.issuer_url())},
        "allowed_algorithms": ["ES256"],
        "audiences": [DEV_AUDIENCE],
        "leeway_secs": 30,
        "max_token_age_secs": 3600,
        "replay_protection": false,
        "max_token_bytes": null,
    });
    let rule = json!({
        "name": DEV_ISSUER_NAME,
        "issuer": DEV_ISSUER_NAME,
        "priority": 100,
        "conditions": [],
        "workload_template": "spiffe://{trust_domain}/dev/{sub}",
        "task_claim": "task",
    });
    let destination = json!({
        "name": DEV_DESTINATION,
        "kind": "jwt",
        "default_ttl_secs": 300,
        "max_ttl_secs": 900,
        "scopes": ["read", "write"],
        "labels": {"env": "dev"},
        "settings": {"audience": "https://dev-api.local"},
    });
    (issuer, rule, destination)
}
